// Pushes the homeserver never made. Room keys first: Synapse counts an appservice as down after any transaction that failed,
// and until its retry goes through it drops the to-device messages it would have pushed: room keys for ferry's
// bot device are lost on the way. A key request gets a lost key back only while it is its sender's current
// session (clients forward nothing else to another user's device); a message sent just before a rotation would
// stay undecryptable. ferry fetches what the homeserver still holds in its device's inbox instead. On Dendrite
// the same steps run (ferry's device reads its to-device messages with /sync there, and nothing is dropped).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { inviteBot, linkWithPower, startStack } from "../lib/stack.js";
import { createUser } from "../lib/users.js";
import { decrypter, serverHistory } from "../lib/history.js";
import { pollUntil, sleep } from "../lib/util.js";

let stack, alice, bob, roomA, roomB;
const isGhost = (u) => u.startsWith("@_ferry_");

before(async () => {
    stack = await startStack({
        syncProxy: true, // to hand ferry a /sync answer late (the last test)
        // Every transaction to ferry fails while the proxy is on.
        faults: { toFerry: { seed: 31, rate: 1, off: true, faults: "503=1" } },
    });
    [alice, bob] = await Promise.all([createUser(stack.hs.url, "alice"), createUser(stack.hs.url, "bob")]);
    roomA = await alice.createEncryptedRoom({ name: "Dropped A" });
    roomB = await bob.createEncryptedRoom({ name: "Dropped B" });
    await inviteBot(stack, alice, roomA);
    await inviteBot(stack, bob, roomB);
    await linkWithPower(stack, alice, roomA, bob, roomB);
    await alice.sendText(roomA, "warm-up");
    await bob.waitForText(roomB, "warm-up", 60000);
});

after(async () => {
    await Promise.all([alice?.stop(), bob?.stop()]);
    await stack?.stop();
});

test("a room key the homeserver dropped instead of pushing, for a session its sender has rotated since, is fetched", async () => {
    const { toFerry } = stack.faultProxies;
    await toFerry.on();
    // The homeserver's next transaction fails: from then on it counts ferry as down and drops to-device messages.
    await alice.sendText(roomA, "sent while ferry counts as down");
    // alice's client starts a new session: the first one is no longer hers to forward.
    await alice.client.getCrypto().forceDiscardSession(roomA);
    await alice.sendText(roomA, "sent after alice's rotation");
    await sleep(1500);
    await toFerry.off();
    const first = await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.content.body === "sent while ferry counts as down", 90000, "the copy of the message whose room key was dropped");
    const second = await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.content.body === "sent after alice's rotation", 60000, "the copy of the message after the rotation");
    assert.equal(first.isDecryptionFailure, false);
    assert.equal(second.isDecryptionFailure, false);
    const tallies = await toFerry.tallies();
    assert.ok(tallies.faults["503"] > 0, `transactions failed: ${tallies.line}`);
});

// A message whose transaction never reaches ferry. Synapse 1.163.2 can leave a transaction unsent after ferry's
// restart (its retry loop counts the appservice as up again while one is being stored: docs/OPERATING.md); here the
// proxy answers the homeserver's transaction for it and never hands it on, and the homeserver counts it as
// delivered. ferry's bot sees the message in its /sync (on both paths) and relays it in its place, before the
// messages that followed it.
test("a message whose transaction never reached ferry is relayed, in its place", async () => {
    const { toFerry } = stack.faultProxies;
    const before = (await toFerry.tallies()).dropped ?? 0;
    // Only a transaction without Olm to-device messages: a room key lost on the way is the test above.
    await toFerry.dropNext([roomA, "m.megolm.v1.aes-sha2"], ["m.olm.v1.curve25519-aes-sha2"]);
    const bodies = ["its transaction never reached ferry", "sent after the lost transaction", "and one more"];
    await alice.sendText(roomA, bodies[0]);
    await pollUntil(async () => ((await toFerry.tallies()).dropped ?? 0) > before, { timeoutMs: 30000, what: "the proxy to drop the message's transaction" });
    await alice.sendText(roomA, bodies[1]);
    await alice.sendText(roomA, bodies[2]);
    for (const body of bodies) {
        const copy = await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.content.body === body, 60000, `the copy of "${body}"`);
        assert.equal(copy.isDecryptionFailure, false, `the copy of "${body}" cannot be decrypted`);
    }
    // In the linked room's server-side history, once each and in the order sent.
    const decrypt = decrypter(bob);
    const seen = [];
    for (const raw of await serverHistory(bob, roomB)) {
        const body = isGhost(raw.sender) ? (await decrypt(raw))?.content?.body : undefined;
        if (bodies.includes(body)) seen.push(body);
    }
    assert.deepEqual(seen, bodies, `copies in bob's room, oldest first: ${JSON.stringify(seen)}`);
});

// The /sync answer that first shows a room the bot joined shows some of the room's history with it, the power
// levels from before the bot's join among it; on Synapse the bot's rooms-only /sync idles for up to 10 s, so that
// answer can reach ferry after the power the room's members gave the bot since. Recorded as new, the old power
// levels took the bot's power away again (seen as disappearing originals that ferry would not redact: "the bot's
// power level 0"). Here the proxy hands ferry that answer late, for certain.
test("an old /sync answer that shows the bot's join does not take away the power it was given since", async () => {
    const roomC = await alice.createEncryptedRoom({ name: "Joined C" });
    const roomD = await bob.createEncryptedRoom({ name: "Joined D" });
    await inviteBot(stack, bob, roomD);
    const { proxy } = stack;
    // The power ferry goes by (its state store).
    const botLevel = () => {
        const [[levels] = []] = stack.sql(`SELECT power_levels FROM mx_room_state WHERE room_id='${roomC}'`);
        return levels ? JSON.parse(levels).users?.[stack.botUserId] : undefined;
    };
    // The answer that shows the bot's join (and so the room's history before it).
    proxy.holdAnswers((body) => body.includes(roomC) && body.includes(`"state_key":"${stack.botUserId}"`) && body.includes('"membership":"join"'));
    let held = [];
    let mark = 0;
    try {
        await inviteBot(stack, alice, roomC, { power: 0 });
        await pollUntil(() => proxy.heldAnswers > 0, { timeoutMs: 15000, what: "the /sync answer that shows the bot's join" });
        await alice.client.setPowerLevel(roomC, stack.botUserId, 50);
        await pollUntil(() => botLevel() === 50, { timeoutMs: 15000, what: "ferry to handle the pushed power levels" });
    } finally {
        mark = proxy.requests.length;
        held = proxy.releaseAnswers();
    }
    // ferry reads its next /sync only once it has recorded the late answer, and its room worker then handles
    // whatever it recorded.
    const sameLoop = (q) => q.path.endsWith("/sync") && held.some((h) => h.filter === q.filter && h.userId === q.userId && h.deviceId === q.deviceId);
    await pollUntil(() => proxy.requests.slice(mark).some(sameLoop), { timeoutMs: 30000, what: "ferry's next /sync after the late answer" });
    await pollUntil(() => Number(stack.sql(`SELECT count(*) FROM inbox WHERE room_id='${roomC}' AND state='pending'`)[0][0]) === 0, {
        timeoutMs: 15000,
        what: "ferry's worker to handle what it recorded of room C",
    });
    assert.equal(botLevel(), 50, "the bot's power level in ferry's state store, as the homeserver has it");
});
