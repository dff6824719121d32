// Room keys the homeserver never pushed. Synapse counts an appservice as down after any transaction that failed,
// and until its retry goes through it drops the to-device messages it would have pushed: room keys for ferry's
// bot device are lost on the way. A key request gets a lost key back only while it is its sender's current
// session (clients forward nothing else to another user's device); a message sent just before a rotation would
// stay undecryptable. ferry fetches what the homeserver still holds in its device's inbox instead. On Dendrite
// the same steps run (ferry's device reads its to-device messages with /sync there, and nothing is dropped).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { inviteBot, linkWithPower, startStack } from "../lib/stack.js";
import { createUser } from "../lib/users.js";
import { sleep } from "../lib/util.js";

let stack, alice, bob, roomA, roomB;
const isGhost = (u) => u.startsWith("@_ferry_");

before(async () => {
    stack = await startStack({
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
