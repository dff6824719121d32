// Issue 12's end-to-end proof that expired means undecryptable: alice's client keeps one Megolm session for many
// messages, so the session that encrypted an expired message also carries messages that have not expired. ferry
// keeps that session for them, but ratchets its stored copies past the expired message: the original's kept
// ciphertext no longer decrypts from anything in ferry's database, while a later message on the same session
// still does.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";
import { command, linkedPair, startStack } from "../lib/stack.js";
import { pollUntil, repoRoot } from "../lib/util.js";

const T = 30000;
const keycheckBin = path.join(repoRoot, "bin", "ferry-keycheck");
const isGhost = (u) => u.startsWith("@_ferry_");
let stack, alice, bob, roomA, roomB;

/** Runs bin/ferry-keycheck on an encrypted event; returns its JSON result. */
function keycheck(raw) {
    const file = path.join(stack.prepared.dir, `keycheck-${raw.event_id.replace(/[^A-Za-z0-9]/g, "")}.json`);
    fs.writeFileSync(file, JSON.stringify(raw));
    return JSON.parse(execFileSync(keycheckBin, ["-c", stack.prepared.configPath, file], { encoding: "utf8" }).trim());
}

/** alice sets the link's timer from room A; room B consents (bob accepts). */
async function setTimer(arg) {
    const asked = await command(stack, alice, roomA, `!ferry disappear ${arg}`);
    if (!/needs consent/.test(asked.content.body)) return asked;
    const id = asked.content.body.match(/request `([0-9a-f]+)`/)[1];
    return command(stack, bob, roomB, `!ferry accept ${id}`);
}

before(async () => {
    assert.ok(fs.existsSync(keycheckBin), `${keycheckBin} is built by make build`);
    stack = await startStack();
    ({ alice, bob, roomA, roomB } = await linkedPair(stack, { names: ["Expiry A", "Expiry B"] }));
});

after(async () => {
    await Promise.all([alice?.stop(), bob?.stop()]);
    await stack?.stop();
});

test("an expired original does not decrypt from ferry's database although its session lives on", async () => {
    assert.match((await setTimer("5s")).content.body, /disappears 5s after/);
    const first = await alice.sendText(roomA, "first, vanishing in five");
    await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.content.body === "first, vanishing in five", T, "the first copy");
    const firstRaw = await alice.client.fetchRoomEvent(roomA, first); // kept before its redaction strips it
    // The timer changes; alice's client keeps its session for the next message, which disappears only in an hour.
    assert.match((await setTimer("1h")).content.body, /disappears 1h 0m after/);
    const second = await alice.sendText(roomA, "second, on the same session");
    await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.content.body === "second, on the same session", T, "the second copy");
    const secondRaw = await alice.client.fetchRoomEvent(roomA, second);
    assert.equal(secondRaw.content.session_id, firstRaw.content.session_id, "alice's client used one session for both (test setup)");
    assert.equal(keycheck(firstRaw).decryptable, true, "before its deadline ferry can still decrypt the first message");

    await alice.waitForEvent(roomA, (e) => e.eventId === first && e.redacted, T, "the first original to be redacted");
    await pollUntil(() => keycheck(firstRaw).decryptable === false, { timeoutMs: 30000, intervalMs: 1000, what: "the first original to become undecryptable from ferry's database" });
    const session = stack.sql(`SELECT count(*) FROM crypto_megolm_inbound_session WHERE session_id='${firstRaw.content.session_id}'`)[0][0];
    assert.notEqual(session, "0", "the session is kept for the message that has not expired");
    assert.equal(keycheck(secondRaw).decryptable, true, "the second message, not expired, still decrypts");
    // alice's commands went on the session too, before the first message: the floor is past it, not at 0.
    const floor = stack.sql(`SELECT ratchet_floor FROM disappear_floor WHERE session_id='${firstRaw.content.session_id}'`);
    assert.equal(floor.length, 1, "ferry remembers the floor of the session");
    assert.ok(Number(floor[0][0]) >= 1, `ferry keeps nothing below index ${floor[0][0]} of the session`);
});
