// A loopback HTTP proxy between ferry and the homeserver that can hold ferry's /sync requests, or swallow the
// answer to one of its sends. On homeservers
// without appservice to-device pushes (Dendrite), room keys reach ferry's bot device only through /sync, so
// holding it makes "the message arrives before its room key" deterministic.
import http from "node:http";
import { freePort } from "./util.js";

export async function startSyncHoldProxy(targetPort) {
    const port = await freePort();
    let holding = false;
    let waiters = [];
    let lose = null; // { roomId, resolve }: see loseNextSend
    const inFlight = new Set(); // open /sync long-polls, cut when holding starts
    const server = http.createServer((req, res) => {
        const forward = () => {
            const up = http.request({ host: "127.0.0.1", port: targetPort, method: req.method, path: req.url, headers: req.headers }, (upRes) => {
                res.writeHead(upRes.statusCode, upRes.headers);
                upRes.pipe(res);
            });
            up.on("error", () => res.destroy());
            req.pipe(up);
        };
        if (lose && req.method === "PUT" && decodeURIComponent(req.url).includes(`/rooms/${lose.roomId}/send/`)) {
            // Posted under another transaction ID, so Dendrite will not recognise ferry's repeat (as with a
            // request cut off before Dendrite answered); ferry never gets the answer.
            const { resolve } = lose;
            lose = null;
            const url = new URL(req.url, "http://x");
            url.pathname += "-forgotten";
            const up = http.request({ host: "127.0.0.1", port: targetPort, method: req.method, path: url.pathname + url.search, headers: req.headers }, (upRes) => {
                let body = "";
                upRes.on("data", (c) => (body += c));
                upRes.on("end", () => resolve({ status: upRes.statusCode, body: JSON.parse(body || "{}") }));
            });
            up.on("error", (e) => resolve({ error: String(e) }));
            req.pipe(up);
            return; // res is left open until ferry goes away
        }
        const isSync = req.url.includes("/sync");
        if (isSync) {
            inFlight.add(res);
            res.on("close", () => inFlight.delete(res));
        }
        if (holding && isSync) waiters.push(forward);
        else forward();
    });
    await new Promise((resolve) => server.listen(port, "127.0.0.1", resolve));
    return {
        url: `http://127.0.0.1:${port}`,
        hold() {
            holding = true;
            // A long-poll already forwarded would still deliver: cut it, so the client's retry is held.
            for (const res of inFlight) res.destroy();
        },
        release() {
            holding = false;
            const w = waiters;
            waiters = [];
            for (const f of w) f();
        },
        /**
         * The next event ferry sends into roomId reaches Dendrite (posted under another transaction ID) but ferry
         * never gets the answer: a send in flight when ferry dies. Resolves with Dendrite's answer.
         */
        loseNextSend(roomId) {
            return new Promise((resolve) => {
                lose = { roomId, resolve };
            });
        },
        get held() {
            return waiters.length;
        },
        close() {
            server.closeAllConnections?.();
            return new Promise((resolve) => server.close(() => resolve()));
        },
    };
}
