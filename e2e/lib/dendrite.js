// Starts a throwaway Dendrite v0.13.8 (SQLite, in a temp dir, loopback only, no federation) for e2e tests.
//
//   const hs = await startDendrite({ appserviceRegistrations: [regPath], sharedSecret: "s3cret" });
//   hs.url, hs.serverName ("ferry.test"), hs.dir; await hs.restart(); await hs.stop();
//
// Env: FERRY_E2E_KEEP=1 keeps the temp dir (config, SQLite files, dendrite.log);
//      FERRY_E2E_DENDRITE_LOG=trace|debug|info|warn sets Dendrite's log level (default info);
//      FERRY_E2E_DENDRITE_DB=postgres puts every component on one fresh database of the Postgres from
//      scripts/with-postgres.sh instead of SQLite files (as large deployments run it).
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { createTestDatabase } from "./ferry.js";
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
    yq,
} from "./util.js";

export const DENDRITE_VERSION = "v0.13.8";
export const dendriteBinDir = path.join(repoRoot, ".cache", `dendrite-${DENDRITE_VERSION}`, "bin");

function binary(name) {
    const p = path.join(dendriteBinDir, name);
    if (!fs.existsSync(p)) {
        throw new Error(`e2e: ${path.relative(repoRoot, p)} is missing: run scripts/dendrite.sh install`);
    }
    return p;
}

/**
 * Dendrite config: every component on its own SQLite file in `dir` (or, with `postgres`, all on that one database),
 * federation and rate limits off.
 */
function configYaml({ dir, serverName, sharedSecret, registrations, logLevel, postgres }) {
    // With a global database the components' own database sections stay out: Dendrite then uses the global pool.
    const db = (name, key = "database") =>
        postgres ? "" : `  ${key}:\n    connection_string: ${yq(`file:${path.join(dir, `${name}.db`)}`)}\n`;
    const globalDb = postgres
        ? `  database:\n    connection_string: ${yq(postgres)}\n    max_open_conns: 50\n    max_idle_conns: 10\n    conn_max_lifetime: -1\n`
        : "";
    const list = (xs) => (xs.length ? "\n" + xs.map((x) => `    - ${yq(x)}`).join("\n") : " []");
    return `version: 2
global:
  server_name: ${yq(serverName)}
${globalDb}  private_key: ${yq(path.join(dir, "matrix_key.pem"))}
  key_validity_period: 168h0m0s
  disable_federation: true
  trusted_third_party_id_servers: []
  presence:
    enable_inbound: false
    enable_outbound: false
  jetstream:
    storage_path: ${yq(path.join(dir, "jetstream"))}
    # On disk, as in production: a restart then keeps what Dendrite had queued (events not yet pushed to
    # appservices, sends not yet processed), which the fault tests restart it on.
    in_memory: false
    topic_prefix: Dendrite
  metrics:
    enabled: false
  report_stats:
    enabled: false
  server_notices:
    enabled: false
    local_part: _server
    display_name: Server Alert
    room_name: Server Alert
  dns_cache:
    enabled: false
app_service_api:
  disable_tls_validation: true
  legacy_auth: false
  legacy_paths: false
  config_files:${list(registrations)}
client_api:
  registration_disabled: false
  registration_requires_token: false
  registration_shared_secret: ${yq(sharedSecret)}
  guests_disabled: true
  enable_registration_captcha: false
  rate_limiting:
    enabled: false
    threshold: 5
    cooloff_ms: 500
federation_api:
${db("federationapi")}  send_max_retries: 1
  key_perspectives: []
key_server:
${db("keyserver")}media_api:
${db("mediaapi")}  base_path: ${yq(path.join(dir, "media"))}
  max_file_size_bytes: 10485760
  dynamic_thumbnails: false
room_server:
${db("roomserver")}  default_room_version: "10"
sync_api:
${db("syncapi")}  search:
    enabled: false
user_api:
  bcrypt_cost: 4
${db("userapi", "account_database")}relay_api:
${db("relayapi")}mscs:
  mscs: []
${db("mscs")}tracing:
  enabled: false
logging:
  - type: file
    level: ${logLevel}
    params:
      path: ${yq(path.join(dir, "logs"))}
`;
}

/**
 * Starts Dendrite. Options:
 *   appserviceRegistrations: registration YAML paths for app_service_api.config_files
 *   sharedSecret: registration_shared_secret (for /_synapse/admin/v1/register); random if omitted
 *   serverName: default "ferry.test"
 *   port: port for 127.0.0.1 (default: a free one; prepareFerry reserves one so ferry's config can name it)
 *   startTimeoutMs: default 30000
 * Returns { url, serverName, dir, port, sharedSecret, logFile, stop(), restart(), logs() }.
 */
export async function startDendrite({
    appserviceRegistrations = [],
    sharedSecret = `secret-${Math.random().toString(36).slice(2)}`,
    serverName = "ferry.test",
    port,
    startTimeoutMs = 30000,
} = {}) {
    printNodeVersionOnce();
    const dendrite = binary("dendrite");
    const generateKeys = binary("generate-keys");
    for (const reg of appserviceRegistrations) {
        if (!fs.existsSync(reg)) throw new Error(`startDendrite: appservice registration ${reg} does not exist`);
    }

    const dbChoice = (process.env.FERRY_E2E_DENDRITE_DB || "sqlite").toLowerCase();
    if (dbChoice !== "sqlite" && dbChoice !== "postgres") {
        throw new Error(`FERRY_E2E_DENDRITE_DB=${process.env.FERRY_E2E_DENDRITE_DB}: expected sqlite or postgres`);
    }
    const database = dbChoice === "postgres" ? createTestDatabase() : null;
    const dir = makeTempDir("ferry-dendrite-");
    const keyPath = path.join(dir, "matrix_key.pem");
    const keys = spawnSync(generateKeys, ["--private-key", keyPath], { encoding: "utf8" });
    if (keys.status !== 0) {
        removeTempDir(dir);
        throw new Error(`startDendrite: generate-keys failed: ${keys.stderr || keys.stdout}`);
    }
    const configPath = path.join(dir, "dendrite.yaml");
    fs.writeFileSync(
        configPath,
        configYaml({
            dir,
            serverName,
            sharedSecret,
            registrations: appserviceRegistrations.map((p) => path.resolve(p)),
            logLevel: process.env.FERRY_E2E_DENDRITE_LOG || "info",
            postgres: database?.uri,
        }),
    );
    port ??= await freePort();
    const url = `http://127.0.0.1:${port}`;
    // Dendrite's own log goes to logs/dendrite.log; its stdout/stderr (startup banner, panics) to this file.
    const outFile = path.join(dir, "dendrite.out");
    const logFile = path.join(dir, "logs", "dendrite.log");

    let child = null;
    const launch = async () => {
        child = spawnTracked(
            dendrite,
            ["-config", configPath, "-http-bind-address", `127.0.0.1:${port}`, "-really-enable-open-registration"],
            { logFile: outFile, cwd: dir },
        );
        const started = Date.now();
        try {
            await pollUntil(async () => (await httpStatus(`${url}/_matrix/client/versions`)) === 200, {
                timeoutMs: startTimeoutMs,
                what: `Dendrite to answer ${url}/_matrix/client/versions`,
                abort: () =>
                    child.exitInfo &&
                    new Error(`Dendrite exited during startup (${JSON.stringify(child.exitInfo)})`),
            });
        } catch (e) {
            await child.stop("SIGKILL");
            const tail = [tailFile(outFile, 15), tailFile(logFile, 15)].filter(Boolean).join("\n");
            throw new Error(`${e.message}\n--- Dendrite output (${dir}) ---\n${tail}`);
        }
        return Date.now() - started;
    };

    try {
        await launch();
    } catch (e) {
        removeTempDir(dir);
        throw e;
    }

    let stopped = false;
    return {
        url,
        serverName,
        dir,
        port,
        sharedSecret,
        configPath,
        logFile,
        /** Dendrite's log so far. */
        logs: () => (fs.existsSync(logFile) ? fs.readFileSync(logFile, "utf8") : ""),
        /** Stops Dendrite (SIGTERM, then SIGKILL) and starts it again on the same port and databases. */
        async restart() {
            if (stopped) throw new Error("restart: Dendrite was already stopped");
            await child.stop("SIGTERM", 10000);
            await launch();
        },
        /** Stops Dendrite and removes its dir (kept with FERRY_E2E_KEEP=1). Safe to call twice. */
        async stop() {
            if (stopped) return;
            stopped = true;
            await child.stop("SIGTERM", 5000);
            removeTempDir(dir);
            database?.drop();
        },
    };
}
