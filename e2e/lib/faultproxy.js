// The fault-injecting proxy of ferry's test kit (internal/faultproxy, run as bin/ferry-faultproxy) for
// end-to-end tests. One proxy serves one direction: between ferry and the homeserver's client API, or between
// the homeserver and ferry's appservice port (see startStack's `faults` option). The Go proxy is the one the Go
// tests use, so both kinds of test meet the same faults from the same seeds.
//
//   const p = await startFaultProxy({ target: "http://127.0.0.1:8008", name: "ferry→hs", seed: 7, rate: 0.09,
//                                     faults: "429=2,502=2,reset-after=2,lost=1,slow=1", forgetTxn: true });
//   p.url; await p.off(); await p.on(); await p.tallies(); await p.stop();  // stop() resolves the final tallies
//   await p.dropNext([roomId, "m.megolm.v1.aes-sha2"], ["m.olm.v1"]);  // the next matching request: 200, never forwarded
import fs from "node:fs";
import path from "node:path";
import { freePort, httpStatus, makeTempDir, pollUntil, removeTempDir, repoRoot, spawnTracked, tailFile } from "./util.js";

export const faultProxyBin = () => path.resolve(process.env.FERRY_FAULTPROXY_BIN || path.join(repoRoot, "bin", "ferry-faultproxy"));

/**
 * Starts a proxy to `target`. Options: name, seed (default 1), rate (0..1, default 0.05), faults (mix, default
 * "all"), retryAfterMs, slowMaxMs, holdMs, forgetTxn, off (start switched off), port (default: a free one).
 * Returns { url, port, on(), off(), tallies(), stop() }; tallies are { name, requests, forwarded,
 * upstream_unreachable, faults: { kind: n }, txn_forgotten } plus a printable `line`.
 */
export async function startFaultProxy({ target, name = "faultproxy", seed = 1, rate = 0.05, faults = "all", retryAfterMs, slowMaxMs, holdMs, forgetTxn = false, off = false, port } = {}) {
    const bin = faultProxyBin();
    if (!fs.existsSync(bin)) throw new Error(`e2e: ${bin} not found: build it with 'make build'`);
    port ??= await freePort();
    const args = ["-listen", `127.0.0.1:${port}`, "-target", target, "-name", name, "-seed", String(seed), "-rate", String(rate), "-faults", faults];
    if (retryAfterMs !== undefined) args.push("-retry-after", `${retryAfterMs}ms`);
    if (slowMaxMs !== undefined) args.push("-slow-max", `${slowMaxMs}ms`);
    if (holdMs !== undefined) args.push("-hold", `${holdMs}ms`);
    if (forgetTxn) args.push("-forget-txn");
    if (off) args.push("-off");
    const dir = makeTempDir("ferry-faultproxy-");
    const outFile = path.join(dir, "faultproxy.out");
    const child = spawnTracked(bin, args, { logFile: outFile });
    const url = `http://127.0.0.1:${port}`;
    const control = async (p, method = "POST", query = "") => {
        const res = await fetch(`${url}/_faultproxy/${p}${query}`, { method });
        if (!res.ok) throw new Error(`fault proxy ${name}: ${p} answered ${res.status}`);
        return withLine(await res.json());
    };
    try {
        await pollUntil(async () => (await httpStatus(`${url}/_faultproxy/tallies`, 1000).catch(() => 0)) === 200, {
            timeoutMs: 10000,
            what: `the fault proxy ${name} to listen`,
            abort: () => child.exitInfo && new Error(`the fault proxy exited: ${tailFile(outFile, 5)}`),
        });
    } catch (e) {
        await child.stop("SIGKILL");
        removeTempDir(dir);
        throw e;
    }
    let last = null;
    return {
        url,
        port,
        on: () => control("on"),
        off: () => control("off"),
        /** Arms one drop: the next request whose body holds every string of `contains` and none of `without` is
         * answered 200 {} and never forwarded (as a transaction the homeserver never sends). */
        dropNext: (contains, without = []) => {
            const q = new URLSearchParams([...contains.map((c) => ["contains", c]), ...without.map((w) => ["without", w])]);
            return control("drop-next", "POST", `?${q}`);
        },
        tallies: () => (child.exitInfo ? Promise.resolve(last) : control("tallies", "GET")),
        /** Stops the proxy; resolves its last tallies. */
        async stop() {
            if (!child.exitInfo) {
                last = await control("tallies", "GET").catch(() => last);
                await child.stop("SIGTERM", 5000);
                removeTempDir(dir);
            }
            return last;
        },
    };
}

/** Adds `line`, the tallies on one line as the Go side prints them. */
function withLine(t) {
    const kinds = Object.entries(t.faults ?? {})
        .filter(([, n]) => n > 0)
        .sort(([a], [b]) => a.localeCompare(b))
        .map(([k, n]) => `${k}=${n}`);
    const injected = Object.values(t.faults ?? {}).reduce((a, n) => a + n, 0);
    let line = `${t.name}: ${t.requests} requests, ${injected} faults`;
    if (kinds.length) line += ` (${kinds.join(" ")})`;
    if (t.txn_forgotten) line += `, ${t.txn_forgotten} forwarded under a forgotten transaction ID`;
    if (t.upstream_unreachable) line += `, upstream unreachable ${t.upstream_unreachable} times`;
    if (t.dropped) line += `, ${t.dropped} dropped as asked`;
    return { ...t, injected, line };
}
