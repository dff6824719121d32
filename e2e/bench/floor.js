// The homeserver's floor for a relayed message: a minimal appservice that copies every message event of one room
// into another at once, as a ghost of its own, with no cryptography and no database. An encrypted event is copied
// verbatim (its receivers cannot decrypt it; the floor measures the homeserver's second hop, not cryptography).
//
//   const floor = await prepareFloor(); startStack({ extraRegistrations: [floor.registrationPath] });
//   await floor.start(hsUrl); await floor.link(roomA, roomB, inviter); ... await floor.stop();
import crypto from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import { freePort, makeTempDir, removeTempDir } from "../lib/util.js";

// With extensions, the floor's registration asks for what ferry's asks for with appservice-mode encryption:
// ephemeral events and to-device messages (MSC2409) and device lists and one-time key counts (MSC3202) in every
// transaction. The floor reads none of it; the homeserver computes it for each transaction all the same.
export async function prepareFloor({ serverName = "ferry.test", extensions = false } = {}) {
    const dir = makeTempDir("ferry-floor-");
    const port = await freePort();
    const asToken = crypto.randomBytes(24).toString("hex");
    const hsToken = crypto.randomBytes(24).toString("hex");
    const ghost = `@_floor_copier:${serverName}`;
    const registrationPath = path.join(dir, "floor-registration.yaml");
    fs.writeFileSync(
        registrationPath,
        [
            "id: floor",
            `url: "http://127.0.0.1:${port}"`,
            `as_token: "${asToken}"`,
            `hs_token: "${hsToken}"`,
            `sender_localpart: "floor-sender-${crypto.randomBytes(4).toString("hex")}"`,
            "rate_limited: false",
            "namespaces:",
            "  users:",
            "    - exclusive: true",
            `      regex: "^@_floor_.*:${serverName.replace(/\./g, "\\\\.")}$"`,
            ...(extensions ? ["de.sorunome.msc2409.push_ephemeral: true", "receive_ephemeral: true", "org.matrix.msc3202: true"] : []),
            "",
        ].join("\n"),
    );
    let hsUrl = null;
    const routes = new Map(); // source room -> target room
    let n = 0;
    const call = async (method, p, body) => {
        const sep = p.includes("?") ? "&" : "?";
        const res = await fetch(`${hsUrl}${p}${sep}user_id=${encodeURIComponent(ghost)}`, {
            method,
            headers: { authorization: `Bearer ${asToken}`, "content-type": "application/json" },
            body: body === undefined ? undefined : JSON.stringify(body),
        });
        if (!res.ok) throw new Error(`floor: ${method} ${p} -> ${res.status} ${await res.text()}`);
        return res.json();
    };
    const server = http.createServer((req, res) => {
        const chunks = [];
        req.on("data", (c) => chunks.push(c));
        req.on("end", () => {
            res.writeHead(200, { "content-type": "application/json" });
            res.end("{}");
            if (req.method !== "PUT" || !req.url.includes("/transactions/")) return;
            let txn;
            try {
                txn = JSON.parse(Buffer.concat(chunks).toString());
            } catch {
                return;
            }
            for (const evt of txn.events ?? []) {
                const target = routes.get(evt.room_id);
                if (!target || evt.state_key !== undefined || evt.sender === ghost) continue;
                const txnId = `floor-${process.pid}-${++n}`;
                call("PUT", `/_matrix/client/v3/rooms/${encodeURIComponent(target)}/send/${encodeURIComponent(evt.type)}/${txnId}`, evt.content).catch(() => {});
            }
        });
    });
    return {
        registrationPath,
        ghost,
        /** Starts answering the homeserver's transactions. */
        async start(url) {
            hsUrl = url;
            await new Promise((resolve) => server.listen(port, "127.0.0.1", resolve));
            await fetch(`${hsUrl}/_matrix/client/v3/register`, {
                method: "POST",
                headers: { authorization: `Bearer ${asToken}`, "content-type": "application/json" },
                body: JSON.stringify({ type: "m.login.application_service", username: "_floor_copier", inhibit_login: true }),
            });
        },
        /** Copies roomA's message events into roomB; `inviter` (a member of both) lets the copier in. */
        async link(roomA, roomB, inviter) {
            for (const room of [roomA, roomB]) {
                await inviter.invite(room, ghost);
                await call("POST", `/_matrix/client/v3/rooms/${encodeURIComponent(room)}/join`, {});
            }
            routes.set(roomA, roomB);
        },
        stop() {
            server.closeAllConnections?.();
            return new Promise((resolve) => server.close(() => (removeTempDir(dir), resolve())));
        },
    };
}
