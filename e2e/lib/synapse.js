// Starts a throwaway Synapse 1.163.2 (SQLite by default, in a temp dir, loopback only, no federation) for e2e
// tests. The config comes from scripts/synapse.sh config, the same generator `make demo HS=synapse` uses.
//
//   const hs = await startSynapse({ appserviceRegistrations: [regPath], sharedSecret: "s3cret" });
//   hs.url, hs.serverName ("ferry.test"), hs.dir; await hs.restart(); await hs.stop();
//
// Env: FERRY_E2E_KEEP=1 keeps the temp dir (homeserver.yaml, homeserver.db, homeserver.log);
//      FERRY_E2E_SYNAPSE_DB=postgres gives every Synapse started without its own postgres URL a fresh database
//      in the test cluster (FERRY_TEST_PG) instead of SQLite, as production Synapse runs;
//      FERRY_E2E_SYNAPSE_LOG=DEBUG|INFO|WARNING sets Synapse's log level (default INFO).
import { execFileSync } from "node:child_process";
import { createTestDatabase } from "./ferry.js";
import fs from "node:fs";
import path from "node:path";
import {
    freePort,
    httpStatus,
    makeTempDir,
    pollUntil,
    printNodeVersionOnce,
    removeTempDir,
    repoRoot,
    spawnTracked,
    tailFile,
} from "./util.js";

export const SYNAPSE_VERSION = "1.163.2";
const script = path.join(repoRoot, "scripts", "synapse.sh");
export const synapsePython = path.join(repoRoot, ".cache", `synapse-${SYNAPSE_VERSION}`, "venv", "bin", "python");

function requireSynapse() {
    if (!fs.existsSync(synapsePython)) {
        throw new Error(`e2e: ${path.relative(repoRoot, synapsePython)} is missing: run scripts/synapse.sh install`);
    }
}

/**
 * Starts Synapse. Options:
 *   appserviceRegistrations: registration YAML paths for app_service_config_files
 *   sharedSecret: registration_shared_secret (for /_synapse/admin/v1/register); random if omitted
 *   serverName: default "ferry.test"
 *   port: port for 127.0.0.1 (default: a free one)
 *   appserviceEncryption: the experimental features appservice-mode encryption needs (default true)
 *   postgres: a postgres:// URL of an empty database instead of SQLite
 *   startTimeoutMs: default 60000
 * Returns { kind: "synapse", url, serverName, dir, port, sharedSecret, logFile, stop(), restart(), kill9(), logs() }.
 */
export async function startSynapse({
    appserviceRegistrations = [],
    sharedSecret = `secret-${Math.random().toString(36).slice(2)}`,
    serverName = "ferry.test",
    port,
    appserviceEncryption = true,
    postgres,
    startTimeoutMs = 60000,
} = {}) {
    printNodeVersionOnce();
    requireSynapse();
    for (const reg of appserviceRegistrations) {
        if (!fs.existsSync(reg)) throw new Error(`startSynapse: appservice registration ${reg} does not exist`);
    }
    const dbChoice = (process.env.FERRY_E2E_SYNAPSE_DB || "sqlite").toLowerCase();
    if (dbChoice !== "sqlite" && dbChoice !== "postgres") {
        throw new Error(`FERRY_E2E_SYNAPSE_DB=${process.env.FERRY_E2E_SYNAPSE_DB}: expected sqlite or postgres`);
    }
    const ownDatabase = !postgres && dbChoice === "postgres" ? createTestDatabase({ collateC: true }) : null;
    if (ownDatabase) postgres = ownDatabase.uri;
    const dir = makeTempDir("ferry-synapse-");
    port ??= await freePort();
    const args = ["config", dir, "--port", String(port), "--server-name", serverName, "--shared-secret", sharedSecret];
    for (const reg of appserviceRegistrations) args.push("--registration", path.resolve(reg));
    if (!appserviceEncryption) args.push("--no-appservice-encryption");
    if (postgres) args.push("--postgres", postgres);
    args.push("--log-level", process.env.FERRY_E2E_SYNAPSE_LOG || "INFO");
    try {
        execFileSync(script, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
    } catch (e) {
        removeTempDir(dir);
        throw new Error(`startSynapse: scripts/synapse.sh config failed: ${e.stderr || e.message}`);
    }
    const url = `http://127.0.0.1:${port}`;
    const outFile = path.join(dir, "homeserver.out");
    const logFile = path.join(dir, "homeserver.log");

    let child = null;
    const launch = async () => {
        child = spawnTracked(synapsePython, ["-m", "synapse.app.homeserver", "-c", path.join(dir, "homeserver.yaml")], {
            logFile: outFile,
            cwd: dir,
        });
        try {
            await pollUntil(async () => (await httpStatus(`${url}/_matrix/client/versions`)) === 200, {
                timeoutMs: startTimeoutMs,
                intervalMs: 100,
                what: `Synapse to answer ${url}/_matrix/client/versions`,
                abort: () => child.exitInfo && new Error(`Synapse exited during startup (${JSON.stringify(child.exitInfo)})`),
            });
        } catch (e) {
            await child.stop("SIGKILL");
            const tail = [tailFile(outFile, 15), tailFile(logFile, 15)].filter(Boolean).join("\n");
            throw new Error(`${e.message}\n--- Synapse output (${dir}) ---\n${tail}`);
        }
    };

    try {
        await launch();
    } catch (e) {
        removeTempDir(dir);
        throw e;
    }

    let stopped = false;
    return {
        kind: "synapse",
        url,
        serverName,
        dir,
        port,
        sharedSecret,
        configPath: path.join(dir, "homeserver.yaml"),
        logFile,
        /** Synapse's log so far. */
        logs: () => (fs.existsSync(logFile) ? fs.readFileSync(logFile, "utf8") : ""),
        /** Stops Synapse (SIGTERM, then SIGKILL) and starts it again on the same port and database. */
        async restart() {
            if (stopped) throw new Error("restart: Synapse was already stopped");
            await child.stop("SIGTERM", 10000);
            await launch();
        },
        /** SIGKILLs Synapse and starts it again (a crash). */
        async crash() {
            if (stopped) throw new Error("crash: Synapse was already stopped");
            await child.stop("SIGKILL");
            await launch();
        },
        /** Stops Synapse and removes its dir (kept with FERRY_E2E_KEEP=1). Safe to call twice. */
        async stop() {
            if (stopped) return;
            stopped = true;
            await child.stop("SIGTERM", 10000);
            removeTempDir(dir);
            ownDatabase?.drop();
        },
    };
}
