// A loopback HTTP proxy between ferry and the homeserver that can hold ferry's /sync requests, swallow the
// answer to one of its sends, or refuse requests as a homeserver would. On homeservers
// without appservice to-device pushes (Dendrite), room keys reach ferry's bot device only through /sync, so
// holding it makes "the message arrives before its room key" deterministic.
import http from "node:http";
import { freePort } from "./util.js";

export async function startSyncHoldProxy(targetPort) {
    const port = await freePort();
    let holding = false;
    let waiters = [];
    let holdAnswer = null; // (body) => true for a /sync answer to keep from ferry: see holdAnswers
    let heldAnswers = []; // the kept answers: { deliver, record }
    let lose = null; // { roomId, resolve }: see loseNextSend
    let refusal = null; // { matches, status, body }: see refuse
    const inFlight = new Set(); // open /sync long-polls, cut when holding starts
    const requests = []; // every request ferry made: see the returned object
    const server = http.createServer((req, res) => {
        const url = new URL(req.url, "http://x");
        const isSync = req.url.includes("/sync");
        const record = { method: req.method, path: decodeURIComponent(url.pathname), userId: url.searchParams.get("user_id"), deviceId: url.searchParams.get("device_id"), filter: url.searchParams.get("filter"), presence: url.searchParams.get("set_presence"), status: 0, uia: false };
        requests.push(record);
        const forward = () => {
            const up = http.request({ host: "127.0.0.1", port: targetPort, method: req.method, path: req.url, headers: req.headers }, (upRes) => {
                record.status = upRes.statusCode;
                if (!holdAnswer || !isSync || record.deviceId) {
                    res.writeHead(upRes.statusCode, upRes.headers);
                    upRes.pipe(res);
                    return;
                }
                const chunks = [];
                upRes.on("data", (c) => chunks.push(c));
                upRes.on("end", () => {
                    const body = Buffer.concat(chunks);
                    const deliver = () => {
                        res.writeHead(upRes.statusCode, upRes.headers);
                        res.end(body);
                    };
                    if (holdAnswer?.(body.toString())) heldAnswers.push({ deliver, record });
                    else deliver();
                });
            });
            up.on("error", () => res.destroy());
            if (record.path.endsWith("/keys/device_signing/upload")) {
                // Whether ferry answered user-interactive auth (a password) to publish an identity.
                const chunks = [];
                req.on("data", (c) => chunks.push(c));
                req.on("end", () => {
                    const body = Buffer.concat(chunks);
                    try {
                        record.uia = JSON.parse(body.toString() || "{}").auth !== undefined;
                    } catch {}
                    up.end(body);
                });
                return;
            }
            req.pipe(up);
        };
        if (refusal?.matches(record)) {
            record.status = refusal.status;
            res.writeHead(refusal.status, { "content-type": "application/json" });
            res.end(JSON.stringify(refusal.body));
            return;
        }
        // ferry's barrier before a read-back (an empty im.ferry.barrier event) is not the send a test means to lose.
        const sendPath = decodeURIComponent(req.url);
        if (lose && req.method === "PUT" && sendPath.includes(`/rooms/${lose.roomId}/send/`) && !sendPath.includes("/send/im.ferry.barrier/")) {
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
         * Keeps the answers to ferry's /sync requests that read rooms (not the to-device catch-ups that name the
         * bot's device) whose body matches (body string => bool) from here on, until releaseAnswers: ferry reads
         * them late, after what happened since (the homeserver computed them when it answered).
         */
        holdAnswers(matches) {
            holdAnswer = matches;
        },
        /** Hands ferry the kept answers, in order; returns the records (see requests) of the requests they answer. */
        releaseAnswers() {
            holdAnswer = null;
            const w = heldAnswers;
            heldAnswers = [];
            for (const { deliver } of w) deliver();
            return w.map(({ record }) => record);
        },
        /** How many /sync answers are kept (holdAnswers). */
        get heldAnswers() {
            return heldAnswers.length;
        },
        /**
         * The next event ferry sends into roomId (other than a read-back's barrier) reaches Dendrite (posted under
         * another transaction ID) but ferry never gets the answer: a send in flight when ferry dies. Resolves with
         * Dendrite's answer.
         */
        loseNextSend(roomId) {
            return new Promise((resolve) => {
                lose = { roomId, resolve };
            });
        },
        get held() {
            return waiters.length;
        },
        /**
         * Answers every request whose record (see requests) matches (record => bool) with status and the JSON body
         * itself, as a homeserver that refuses it would; refuse(null) forwards them again.
         */
        refuse(matches, status = 403, body = { errcode: "M_FORBIDDEN", error: "refused by the test's proxy" }) {
            refusal = matches && { matches, status, body };
        },
        /** Every request ferry made through the proxy: { method, path (decoded), userId, deviceId, filter, presence (set_presence), status, uia }. */
        requests,
        close() {
            server.closeAllConnections?.();
            return new Promise((resolve) => server.close(() => resolve()));
        },
    };
}

/**
 * A loopback proxy between one test client and the homeserver that can withhold that client's to-device messages:
 * while holding, each `PUT .../sendToDevice/...` is answered 200 at once (the client believes it was sent, as when
 * the homeserver lost it) and kept; release() posts the kept ones to the homeserver, in order. Works the same on
 * every homeserver, whatever way ferry receives to-device messages (pushed or through /sync).
 *
 * delayKeyQueries(ms) holds each of the client's /keys/query requests for ms before sending it on.
 *
 *   const proxy = await startClientProxy(hs.port); const alice = await createUser(proxy.url, "alice");
 */
export async function startClientProxy(targetPort) {
    const port = await freePort();
    let holding = false;
    let keyQueryDelayMs = 0;
    const kept = []; // { method, path, headers, body }
    const server = http.createServer((req, res) => {
        const chunks = [];
        req.on("data", (c) => chunks.push(c));
        req.on("end", async () => {
            const body = Buffer.concat(chunks);
            if (keyQueryDelayMs && req.url.includes("/keys/query")) await new Promise((r) => setTimeout(r, keyQueryDelayMs));
            if (holding && req.method === "PUT" && req.url.includes("/sendToDevice/")) {
                kept.push({ method: req.method, path: req.url, headers: req.headers, body });
                res.writeHead(200, { "content-type": "application/json" });
                res.end("{}");
                return;
            }
            const up = http.request({ host: "127.0.0.1", port: targetPort, method: req.method, path: req.url, headers: req.headers }, (upRes) => {
                res.writeHead(upRes.statusCode, upRes.headers);
                upRes.pipe(res);
            });
            up.on("error", () => res.destroy());
            up.end(body);
        });
    });
    await new Promise((resolve) => server.listen(port, "127.0.0.1", resolve));
    const post = ({ method, path, headers, body }) =>
        new Promise((resolve, reject) => {
            const up = http.request({ host: "127.0.0.1", port: targetPort, method, path, headers }, (upRes) => {
                upRes.resume();
                upRes.on("end", () => (upRes.statusCode === 200 ? resolve() : reject(new Error(`${method} ${path} -> ${upRes.statusCode}`))));
            });
            up.on("error", reject);
            up.end(body);
        });
    return {
        url: `http://127.0.0.1:${port}`,
        /** From now on the client's to-device messages are kept instead of sent. */
        holdToDevice() {
            holding = true;
        },
        /** Posts the kept to-device messages (in order) and sends later ones straight through again. */
        async releaseToDevice() {
            holding = false;
            while (kept.length) await post(kept.shift());
        },
        /** Drops the kept to-device messages (as a homeserver that lost them) and sends later ones straight through. */
        dropToDevice() {
            holding = false;
            kept.length = 0;
        },
        /** Delays each of the client's key queries by ms before it is sent on (a client slow to learn keys). */
        delayKeyQueries(ms) {
            keyQueryDelayMs = ms;
        },
        /** How many to-device messages are kept. */
        get keptToDevice() {
            return kept.length;
        },
        close() {
            server.closeAllConnections?.();
            return new Promise((resolve) => server.close(() => resolve()));
        },
    };
}

/**
 * A loopback proxy between the homeserver and ferry (the registration's url points at it): forwards everything and
 * records what each transaction carried, so tests can see what the homeserver pushes.
 * Returns { url, transactions: [{ txnId, events, toDevice: [{type, sender, toUserId, toDeviceId}], deviceLists,
 * otkCounts, status }], close() }: status is 0 while ferry has not answered yet, -1 if it never did.
 */
export async function startPushProxy(port, targetPort) {
    const transactions = [];
    const server = http.createServer((req, res) => {
        const chunks = [];
        req.on("data", (c) => chunks.push(c));
        req.on("end", () => {
            const body = Buffer.concat(chunks);
            let record = null;
            const m = req.method === "PUT" && req.url.match(/\/transactions\/([^/?]+)/);
            if (m) {
                try {
                    const txn = JSON.parse(body.toString() || "{}");
                    const toDevice = txn.to_device ?? txn["de.sorunome.msc2409.to_device"] ?? [];
                    record = {
                        txnId: decodeURIComponent(m[1]),
                        events: (txn.events ?? []).length,
                        toDevice: toDevice.map((e) => ({ type: e.type, sender: e.sender, toUserId: e.to_user_id, toDeviceId: e.to_device_id })),
                        deviceLists: txn.device_lists ?? txn["org.matrix.msc3202.device_lists"] ?? null,
                        otkCounts: txn.device_one_time_keys_count ?? txn["org.matrix.msc3202.device_one_time_keys_count"] ?? null,
                        status: 0,
                    };
                    transactions.push(record);
                } catch {}
            }
            const up = http.request({ host: "127.0.0.1", port: targetPort, method: req.method, path: req.url, headers: req.headers }, (upRes) => {
                if (record) record.status = upRes.statusCode;
                res.writeHead(upRes.statusCode, upRes.headers);
                upRes.pipe(res);
            });
            up.on("error", () => {
                if (record) record.status = -1; // ferry did not answer at all
                res.destroy();
            });
            up.end(body);
        });
    });
    await new Promise((resolve) => server.listen(port, "127.0.0.1", resolve));
    return {
        url: `http://127.0.0.1:${port}`,
        transactions,
        close() {
            server.closeAllConnections?.();
            return new Promise((resolve) => server.close(() => resolve()));
        },
    };
}
