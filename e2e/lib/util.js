// Shared helpers for ferry's end-to-end harness: repo paths, free ports, timeouts, child processes that never
// outlive the test process, and temp dirs that are removed unless FERRY_E2E_KEEP=1 or a test of the file failed.
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
export const keepArtifacts = process.env.FERRY_E2E_KEEP === "1";

// Under `node --test` each test file runs in a process of its own: once one of its tests fails, the homeserver's
// and ferry's directories (logs, configs, SQLite files) and databases of that file are kept, so a failure that
// comes once in many runs can still be read afterwards.
let failedTest = null;
if (process.env.NODE_TEST_CONTEXT) {
    const { afterEach } = await import("node:test");
    afterEach((t) => {
        if (!t.passed && !failedTest) failedTest = t.name;
    });
}

/** Whether temp dirs and databases are kept: FERRY_E2E_KEEP=1, or a test in this process failed. */
export function keeping() {
    return keepArtifacts || failedTest !== null;
}

/** Why artifacts are kept, for the line that names them. */
export function keepReason() {
    return keepArtifacts ? "FERRY_E2E_KEEP=1" : `the test "${failedTest}" failed`;
}

let printedNode = false;
/** Prints the Node version once per process (matrix-js-sdk 43 needs Node >= 22). */
export function printNodeVersionOnce() {
    if (printedNode) return;
    printedNode = true;
    console.log(`e2e: node ${process.version}`);
    const major = Number(process.versions.node.split(".")[0]);
    if (major < 22) {
        throw new Error(`e2e: matrix-js-sdk 43 needs Node >= 22 but this is ${process.version}: run the tests with scripts/node22`);
    }
}

/** Asks the kernel for a free TCP port on 127.0.0.1. */
// Ports handed out by this process: the OS may offer a just-released port again, and two reservations made
// before either server binds (ferry's and Dendrite's) must never collide.
const issuedPorts = new Set();

export async function freePort() {
    for (let i = 0; i < 50; i++) {
        const port = await osFreePort();
        if (!issuedPorts.has(port)) {
            issuedPorts.add(port);
            return port;
        }
    }
    throw new Error("freePort: no unused loopback port after 50 tries");
}

function osFreePort() {
    return new Promise((resolve, reject) => {
        const srv = net.createServer();
        srv.unref();
        srv.on("error", reject);
        srv.listen(0, "127.0.0.1", () => {
            const { port } = srv.address();
            srv.close(() => resolve(port));
        });
    });
}

/** Rejects with `Timed out after Nms waiting for <what>` unless `promise` settles first. */
export function withTimeout(promise, ms, what) {
    let timer;
    const timeout = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`Timed out after ${ms}ms waiting for ${what}`)), ms);
    });
    return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Polls `check` (async, returns a truthy value when done) every `intervalMs` until it succeeds or `timeoutMs`
 * passes. Only for things that cannot be awaited as events (e.g. a server starting to listen). `abort` may
 * return an Error to stop early (e.g. the process died).
 */
export async function pollUntil(check, { timeoutMs, intervalMs = 50, what, abort }) {
    const deadline = Date.now() + timeoutMs;
    let lastErr;
    for (;;) {
        const stop = abort?.();
        if (stop) throw stop;
        try {
            const v = await check();
            if (v) return v;
        } catch (e) {
            lastErr = e;
        }
        if (Date.now() > deadline) {
            throw new Error(`Timed out after ${timeoutMs}ms waiting for ${what}${lastErr ? ` (last error: ${lastErr.message})` : ""}`);
        }
        await sleep(intervalMs);
    }
}

/** HTTP GET that resolves with the status code (or throws on connection errors), with its own timeout. */
export async function httpStatus(url, timeoutMs = 2000) {
    const res = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) });
    await res.arrayBuffer();
    return res.status;
}

// ---- temp dirs ------------------------------------------------------------------------------------------------
const tempDirs = new Set();

const OWNER_FILE = ".e2e-owner-pid";
const swept = new Set();

/** Removes dirs `<tmp>/<prefix>*` left by a test process that was SIGKILLed (its owner pid is gone). */
function sweepStale(prefix) {
    if (swept.has(prefix)) return;
    swept.add(prefix);
    for (const name of fs.readdirSync(os.tmpdir())) {
        if (!name.startsWith(prefix)) continue;
        const dir = path.join(os.tmpdir(), name);
        let pid;
        try {
            pid = Number(fs.readFileSync(path.join(dir, OWNER_FILE), "utf8"));
        } catch {
            continue; // kept on purpose (FERRY_E2E_KEEP=1) or not ours
        }
        try {
            process.kill(pid, 0);
        } catch (e) {
            if (e.code === "ESRCH") fs.rmSync(dir, { recursive: true, force: true });
        }
    }
}

/** Makes a temp dir (removed by removeTempDir or at exit, unless FERRY_E2E_KEEP=1). */
export function makeTempDir(prefix) {
    installExitHooks();
    sweepStale(prefix);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
    fs.writeFileSync(path.join(dir, OWNER_FILE), String(process.pid));
    tempDirs.add(dir);
    return dir;
}

function keepOrRemove(dir) {
    if (keeping()) {
        fs.rmSync(path.join(dir, OWNER_FILE), { force: true });
        console.log(`e2e: kept ${dir} (${keepReason()})`);
    } else {
        fs.rmSync(dir, { recursive: true, force: true });
    }
}

export function removeTempDir(dir) {
    if (!tempDirs.delete(dir)) return;
    keepOrRemove(dir);
}

// ---- child processes ------------------------------------------------------------------------------------------
const children = new Set();
let hooksInstalled = false;

// setpriv --pdeathsig makes the kernel SIGKILL the child when this process dies, even by SIGKILL.
const setpriv = (() => {
    const r = spawnSync("setpriv", ["--help"], { encoding: "utf8" });
    return r.status === 0 && r.stdout.includes("--pdeathsig") ? "setpriv" : null;
})();

function killAllChildrenSync() {
    for (const child of children) {
        try {
            child.kill("SIGKILL");
        } catch {
            // already gone
        }
    }
    children.clear();
}

function installExitHooks() {
    if (hooksInstalled) return;
    hooksInstalled = true;
    process.on("exit", () => {
        killAllChildrenSync();
        for (const dir of tempDirs) keepOrRemove(dir);
        tempDirs.clear();
    });
    for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) {
        process.once(sig, () => {
            killAllChildrenSync();
            process.exit(128 + os.constants.signals[sig]);
        });
    }
}

/**
 * Spawns `cmd args` with stdout+stderr appended to `logFile`, tracked so it is killed when this process exits.
 * Resolves the returned object's `exited` promise with `{ code, signal }`.
 */
export function spawnTracked(cmd, args, { logFile, cwd, env } = {}) {
    installExitHooks();
    if (!fs.existsSync(cmd)) throw new Error(`e2e: ${cmd} does not exist`);
    const out = logFile ? fs.openSync(logFile, "a") : "ignore";
    const [file, argv] = setpriv ? [setpriv, ["--pdeathsig", "KILL", "--", cmd, ...args]] : [cmd, args];
    const proc = spawn(file, argv, { cwd, env: env ?? process.env, stdio: ["ignore", out, out] });
    if (typeof out === "number") fs.closeSync(out);
    children.add(proc);
    let exitInfo = null;
    const exited = new Promise((resolve) => {
        proc.once("exit", (code, signal) => {
            children.delete(proc);
            exitInfo = { code, signal };
            resolve(exitInfo);
        });
        proc.once("error", (err) => {
            children.delete(proc);
            exitInfo = { code: null, signal: null, error: err };
            resolve(exitInfo);
        });
    });
    return {
        proc,
        exited,
        /** null while running, else `{ code, signal }`. */
        get exitInfo() {
            return exitInfo;
        },
        /** Sends `signal`, waits up to `graceMs` for exit, then SIGKILLs. */
        async stop(signal = "SIGTERM", graceMs = 10000) {
            if (exitInfo) return exitInfo;
            proc.kill(signal);
            let timer;
            const res = await Promise.race([
                exited,
                new Promise((r) => {
                    timer = setTimeout(() => r(null), graceMs);
                }),
            ]);
            clearTimeout(timer);
            if (res) return res;
            proc.kill("SIGKILL");
            return exited;
        },
    };
}

/** Last `n` lines of a text file (for error messages); "" if it does not exist. */
export function tailFile(file, n = 30) {
    try {
        const lines = fs.readFileSync(file, "utf8").trimEnd().split("\n");
        return lines.slice(-n).join("\n");
    } catch {
        return "";
    }
}

/** Quotes a string as a YAML scalar (JSON strings are valid YAML double-quoted scalars). */
export const yq = (s) => JSON.stringify(String(s));
