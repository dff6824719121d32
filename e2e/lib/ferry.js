// Runs the ferry binary for e2e tests, plus throwaway Postgres databases for it.
//
// Order matters: ferry's registration must exist before Dendrite starts, and ferry's config must name Dendrite's
// URL, so prepareFerry also reserves Dendrite's port:
//
//   const prepared = await prepareFerry({ admins: [adminId] });            // config.yaml + registration.yaml
//   const hs = await startDendrite({ appserviceRegistrations: [prepared.registrationPath],
//                                    sharedSecret: prepared.sharedSecret, port: prepared.hsPort });
//   const ferry = await startFerry(prepared);                              // waits for /_matrix/mau/ready
//   ... await ferry.stop(); await hs.stop(); prepared.cleanup();
//
// (lib/stack.js wraps this sequence with a fresh Postgres database.)
//
// Env: FERRY_BIN (default <repo>/bin/ferry), FERRY_TEST_PG (admin URL for createTestDatabase), FERRY_E2E_KEEP=1.
import { spawnSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import {
    freePort,
    httpStatus,
    keepReason,
    keeping,
    makeTempDir,
    pollUntil,
    removeTempDir,
    repoRoot,
    spawnTracked,
    tailFile,
} from "./util.js";

export const ferryBin = () => path.resolve(process.env.FERRY_BIN || path.join(repoRoot, "bin", "ferry"));

/** Throws a one-line error unless the ferry binary exists. */
export function requireFerryBin() {
    const bin = ferryBin();
    if (!fs.existsSync(bin)) {
        throw new Error(
            `e2e: ferry binary not found at ${bin}: build it with 'go build -o bin/ferry ./cmd/ferry' or set FERRY_BIN`,
        );
    }
    return bin;
}

// ---- YAML -------------------------------------------------------------------------------------------------------
const isPlainObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);

function yamlScalar(v) {
    if (v === null || v === undefined) return "null";
    if (typeof v === "boolean" || typeof v === "number") return String(v);
    return JSON.stringify(String(v)); // JSON strings are valid YAML double-quoted scalars
}

const yamlKey = (k) => (/^[A-Za-z_][A-Za-z0-9_]*$/.test(k) ? k : JSON.stringify(k));

/** Serialises plain objects, arrays and scalars as block-style YAML. */
export function toYaml(value, indent = "") {
    if (isPlainObject(value)) {
        const keys = Object.keys(value).filter((k) => value[k] !== undefined);
        if (!keys.length) return "{}";
        return keys
            .map((k) => {
                const v = value[k];
                const nested = (isPlainObject(v) && Object.keys(v).length) || (Array.isArray(v) && v.length);
                return nested
                    ? `${indent}${yamlKey(k)}:\n${toYaml(v, indent + "  ")}`
                    : `${indent}${yamlKey(k)}: ${toYaml(v, indent + "  ")}`;
            })
            .join("\n");
    }
    if (Array.isArray(value)) {
        if (!value.length) return "[]";
        return value
            .map((item) => {
                if (isPlainObject(item) || Array.isArray(item)) {
                    const inner = toYaml(item, indent + "  ");
                    return `${indent}- ${inner.slice(indent.length + 2)}`;
                }
                return `${indent}- ${yamlScalar(item)}`;
            })
            .join("\n");
    }
    return yamlScalar(value);
}

/** Recursively merges `extra` into `base` (objects merge, everything else replaces; undefined deletes). */
export function deepMerge(base, extra) {
    const out = { ...base };
    for (const [k, v] of Object.entries(extra ?? {})) {
        if (v === undefined) delete out[k];
        else if (isPlainObject(v) && isPlainObject(out[k])) out[k] = deepMerge(out[k], v);
        else out[k] = v;
    }
    return out;
}

/** Reads a top-level `key: value` from simple YAML (enough for the registration's tokens). */
export function yamlTopLevel(text, key) {
    const m = text.match(new RegExp(`^${key}:[ \\t]*(.*?)[ \\t]*$`, "m"));
    if (!m) return undefined;
    const v = m[1];
    if (v.startsWith('"')) return JSON.parse(v);
    if (v.startsWith("'")) return v.slice(1, -1).replace(/''/g, "'");
    return v;
}

// ---- config -----------------------------------------------------------------------------------------------------
/**
 * The config object prepareFerry writes. `db` is { type, uri } (e.g. from createTestDatabase()) or omitted for a
 * SQLite file in `dir`.
 */
export function ferryConfig({ dir, port, hsUrl, hsDomain, sharedSecret, db, permissions, admins = [], extraConfig }) {
    const database = db ?? { type: "sqlite3-fk-wal", uri: `file:${path.join(dir, "ferry.db")}?_txlock=immediate` };
    const perms = { "*": "relay", [hsDomain]: "user", ...permissions };
    for (const a of admins) perms[a] = "admin";
    const base = {
        homeserver: { address: hsUrl, domain: hsDomain, registration_shared_secret: sharedSecret },
        appservice: {
            address: `http://127.0.0.1:${port}`,
            hostname: "127.0.0.1",
            port,
            id: "ferry",
            bot: { username: "ferrybot", displayname: "ferry" },
            as_token: "",
            hs_token: "",
        },
        database: { type: database.type, uri: database.uri },
        bridge: { command_prefix: "!ferry", ghost_prefix: "_ferry_" },
        encryption: { pickle_key: "generate" },
        permissions: perms,
        logging: { min_level: "debug", format: "json", file: path.join(dir, "ferry.log") },
    };
    return deepMerge(base, extraConfig);
}

function runFerrySync(args, dir) {
    const bin = requireFerryBin();
    const r = spawnSync(bin, args, { cwd: dir, encoding: "utf8", timeout: 30000 });
    if (r.error) throw new Error(`ferry ${args.join(" ")}: ${r.error.message}`);
    if (r.status !== 0) {
        throw new Error(`ferry ${args.join(" ")} exited ${r.status}: ${(r.stderr || r.stdout).trim()}`);
    }
    return r.stdout;
}

/**
 * Writes config.yaml in a new temp dir and runs `ferry -g` to produce registration.yaml (ferry writes the tokens
 * back into config.yaml). Options:
 *   hsDomain ("ferry.test"), hsUrl (default: http://127.0.0.1:<hsPort> with a port reserved here for Dendrite),
 *   sharedSecret (random), db ({type, uri}; default SQLite in the dir), permissions (merged over
 *   {"*": relay, <hsDomain>: user}), admins ([userId] → admin), extraConfig (deep-merged into the config; its
 *   appservice.address is what the registration gives the homeserver), port (ferry's appservice port; default: a
 *   free one).
 * Returns { dir, configPath, registrationPath, port, hsUrl, hsPort, hsDomain, sharedSecret, asToken, hsToken,
 *           botUserId, config, cleanup() }.
 */
export async function prepareFerry({
    hsDomain = "ferry.test",
    hsUrl,
    sharedSecret = `ferry-e2e-${crypto.randomBytes(12).toString("hex")}`,
    db,
    permissions = {},
    admins = [],
    extraConfig = {},
    port,
} = {}) {
    requireFerryBin();
    const dir = makeTempDir("ferry-e2e-");
    try {
        port ??= await freePort();
        let hsPort;
        if (!hsUrl) {
            hsPort = await freePort();
            hsUrl = `http://127.0.0.1:${hsPort}`;
        } else {
            hsPort = Number(new URL(hsUrl).port) || undefined;
        }
        const config = ferryConfig({ dir, port, hsUrl, hsDomain, sharedSecret, db, permissions, admins, extraConfig });
        const configPath = path.join(dir, "config.yaml");
        const registrationPath = path.join(dir, "registration.yaml");
        fs.writeFileSync(configPath, toYaml(config) + "\n", { mode: 0o600 });
        runFerrySync(["-g", "-c", configPath, "-r", registrationPath], dir);
        if (!fs.existsSync(registrationPath)) throw new Error(`ferry -g did not write ${registrationPath}`);
        const reg = fs.readFileSync(registrationPath, "utf8");
        const asToken = yamlTopLevel(reg, "as_token");
        const hsToken = yamlTopLevel(reg, "hs_token");
        if (!asToken || !hsToken) throw new Error(`ferry -g wrote a registration without tokens: ${registrationPath}`);
        return {
            dir,
            configPath,
            registrationPath,
            port,
            hsUrl,
            hsPort,
            hsDomain,
            sharedSecret,
            asToken,
            hsToken,
            botUserId: `@${config.appservice.bot.username}:${hsDomain}`,
            config,
            cleanup: () => removeTempDir(dir),
        };
    } catch (e) {
        removeTempDir(dir);
        throw e;
    }
}

/** Parsed JSON lines of a ferry log file (non-JSON lines are returned as { message: line }). */
function parseLog(text) {
    return text
        .split("\n")
        .filter(Boolean)
        .map((line) => {
            try {
                return JSON.parse(line);
            } catch {
                return { message: line };
            }
        });
}

/**
 * Starts `ferry -c config.yaml` and waits until GET /_matrix/mau/ready (or /health/ready) answers 200 (unless
 * waitReady is false: for tests of a start that should fail).
 * Returns { proc, pid, exited, stop(), kill9(), restart(), logs(), logLines(), waitForLog(pred, ms) }.
 * stdout/stderr go to <dir>/ferry.out; the JSON log to <dir>/ferry.log.
 */
export async function startFerry(prepared, { readyTimeoutMs = 30000, env, waitReady = true } = {}) {
    const bin = requireFerryBin();
    const { dir, configPath, port } = prepared;
    const outFile = path.join(dir, "ferry.out");
    const logFile = prepared.config?.logging?.file ?? path.join(dir, "ferry.log");
    const base = `http://127.0.0.1:${port}`;
    let child;

    const launch = async () => {
        child = spawnTracked(bin, ["-c", configPath], { logFile: outFile, cwd: dir, env: { ...process.env, ...env } });
        if (!waitReady) return;
        try {
            await pollUntil(
                async () => {
                    for (const p of ["/_matrix/mau/ready", "/health/ready"]) {
                        if ((await httpStatus(base + p, 1000).catch(() => 0)) === 200) return true;
                    }
                    return false;
                },
                {
                    timeoutMs: readyTimeoutMs,
                    what: `ferry to answer ${base}/_matrix/mau/ready`,
                    abort: () =>
                        child.exitInfo && new Error(`ferry exited during startup (${JSON.stringify(child.exitInfo)})`),
                },
            );
        } catch (e) {
            await child.stop("SIGKILL");
            const tail = [tailFile(outFile, 20)].filter(Boolean).join("\n");
            throw new Error(`${e.message}\n--- ferry output (${outFile}) ---\n${tail}`);
        }
    };
    await launch();

    const logs = () => (fs.existsSync(logFile) ? fs.readFileSync(logFile, "utf8") : "");
    const handle = {
        get proc() {
            return child.proc;
        },
        get pid() {
            return child.proc.pid;
        },
        get exited() {
            return child.exited;
        },
        get exitInfo() {
            return child.exitInfo;
        },
        url: base,
        logFile,
        outFile,
        /** The JSON log so far, as text. */
        logs,
        /** The JSON log so far, parsed. */
        logLines: () => parseLog(logs()),
        /** Waits until a log line (parsed object) satisfies `predicate`. */
        waitForLog: (predicate, timeoutMs = 15000, what = "a matching ferry log line") =>
            pollUntil(() => parseLog(logs()).find(predicate), {
                timeoutMs,
                intervalMs: 50,
                what,
                abort: () => child.exitInfo && new Error(`ferry exited (${JSON.stringify(child.exitInfo)}) before ${what}`),
            }),
        /** SIGTERM, wait for a graceful exit (SIGKILL after `graceMs`); resolves { code, signal }. */
        stop: (graceMs = 10000) => child.stop("SIGTERM", graceMs),
        /** SIGKILL, as in a crash; resolves { code, signal }. */
        kill9: () => child.stop("SIGKILL"),
        /** Stops ferry if running and starts it again with the same config and database. */
        async restart() {
            await child.stop("SIGTERM", 10000);
            await launch();
        },
    };
    return handle;
}

// ---- Postgres ---------------------------------------------------------------------------------------------------
const openDatabases = new Map(); // name -> admin URL
let pgExitHook = false;

function psql(adminUrl, sql) {
    const r = spawnSync("psql", [adminUrl, "-v", "ON_ERROR_STOP=1", "-qAtX", "-c", sql], {
        encoding: "utf8",
        timeout: 30000,
    });
    if (r.error?.code === "ENOENT") throw new Error("e2e: psql not found in PATH (Debian: apt-get install postgresql-client)");
    if (r.error) throw new Error(`psql: ${r.error.message}`);
    if (r.status !== 0) throw new Error(`psql ${JSON.stringify(sql)}: ${r.stderr.trim()}`);
    return r.stdout.trim();
}

function dropDatabaseSync(adminUrl, name) {
    openDatabases.delete(name);
    try {
        psql(adminUrl, `DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`);
    } catch {
        psql(adminUrl, `DROP DATABASE IF EXISTS "${name}"`); // PostgreSQL < 13
    }
}

/**
 * Creates a fresh database on the server named by FERRY_TEST_PG (a postgres:// admin URL, e.g.
 * postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable). Returns { type: "postgres", uri, name, drop() }.
 * Databases not dropped are dropped at process exit (unless kept: FERRY_E2E_KEEP=1 or a failed test).
 * { collateC: true } makes it with the C collation, which Synapse requires of its database.
 */
export function createTestDatabase({ collateC = false } = {}) {
    const adminUrl = process.env.FERRY_TEST_PG;
    if (!adminUrl) {
        throw new Error(
            "e2e: FERRY_TEST_PG is unset: run under scripts/with-postgres.sh or set it to an admin URL like postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable",
        );
    }
    const name = `ferry_e2e_${Date.now().toString(36)}_${crypto.randomBytes(3).toString("hex")}`;
    psql(adminUrl, `CREATE DATABASE "${name}"${collateC ? ` TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'` : ""}`);
    openDatabases.set(name, adminUrl);
    if (!pgExitHook) {
        pgExitHook = true;
        process.on("exit", () => {
            if (keeping()) return;
            for (const [n, url] of openDatabases) {
                try {
                    dropDatabaseSync(url, n);
                } catch {
                    // best effort at exit
                }
            }
        });
    }
    const u = new URL(adminUrl);
    u.pathname = `/${name}`;
    return {
        type: "postgres",
        uri: u.toString(),
        name,
        drop() {
            if (!openDatabases.has(name)) return;
            if (keeping()) {
                openDatabases.delete(name);
                console.log(`e2e: kept database ${name} (${keepReason()})`);
                return;
            }
            dropDatabaseSync(adminUrl, name);
        },
    };
}
