// Issue 12's end-to-end proof that trust is not laundered: alice has a cross-signing identity and writes from a
// second device she never verified. Her own other device shows that message with a red shield; its copy comes from
// her ghost's cross-signed device, which no client flags, so ferry must carry the warning itself. By default
// (encryption.untrusted_messages: mark) the copy's body starts with a visible warning and its content names the
// reason under im.ferry.sender_trust; with "refuse" it is not relayed at all. A message from her verified device
// crosses unmarked.
import assert from "node:assert/strict";
import fs from "node:fs";
import { after, before, test } from "node:test";
import { createUser, loginUser } from "../lib/users.js";
import { inviteBot, linkByRequest, startStack } from "../lib/stack.js";

const T = 30000;
let stack, alice, aliceUnsigned, bob, roomA, roomB;

const isGhost = (userId) => userId.startsWith("@_ferry_");

/** Waits in room B for the copy of a message whose body ends with `text` (a marked copy starts with a warning). */
function copyOf(text) {
    return bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.type === "m.room.message" && (e.content.body ?? "").endsWith(text), T, `the copy of "${text}"`);
}

before(async () => {
    stack = await startStack({ permissions: { "*": "relay", "ferry.test": "user" } });
    [alice, bob] = await Promise.all([createUser(stack.hs.url, "alice"), createUser(stack.hs.url, "bob")]);
    await alice.bootstrapCrossSigning();
    roomA = await alice.createEncryptedRoom({ name: "Trust A" });
    roomB = await bob.createEncryptedRoom({ name: "Trust B" });
    await inviteBot(stack, alice, roomA);
    await inviteBot(stack, bob, roomB);
    await linkByRequest(stack, alice, roomA, bob, roomB);
    // A second device of alice's that she never cross-signs.
    aliceUnsigned = await loginUser(stack.hs.url, alice.userId, alice.password);
    await aliceUnsigned.waitForRoom(roomA, { encrypted: true });
    await alice.waitForDeviceKnown(alice.userId, aliceUnsigned.deviceId);
});

after(async () => {
    await Promise.all([alice?.stop(), aliceUnsigned?.stop(), bob?.stop()]);
    await stack?.stop();
});

test("a message from an unverified device of a cross-signed user arrives marked, not looking trusted", async () => {
    await alice.sendText(roomA, "from my verified device");
    const trusted = await copyOf("from my verified device");
    assert.equal(trusted.content.body, "from my verified device", "a verified device's message crosses unmarked");
    assert.equal(trusted.content["im.ferry.sender_trust"], undefined);

    const sent = await aliceUnsigned.sendText(roomA, "from a device I never verified");
    // In room A, alice's clients flag it.
    const original = await alice.waitForEvent(roomA, (e) => e.eventId === sent, T, "the original at alice's verified device");
    const shield = await alice.encryptionInfo(original);
    assert.equal(shield.colour, "RED", `the source room's client flags it: ${JSON.stringify(shield)}`);
    // In room B, the copy comes from alice's ghost, whose device is cross-signed: no client would flag it, so ferry
    // marks it.
    const copy = await copyOf("from a device I never verified");
    assert.match(copy.content.body, /^⚠️ \[sent from a device its owner has not verified\] from a device I never verified$/);
    assert.deepEqual(copy.content["im.ferry.sender_trust"], { flag: "unsigned_device", warning: "⚠️ [sent from a device its owner has not verified] " });
    const copyShield = await bob.encryptionInfo(copy);
    assert.equal(copyShield.colour, "NONE", "the ghost's device itself is trusted: the marker is what carries the warning");
});

test("with untrusted_messages: refuse, such a message is not relayed at all", async () => {
    const cfg = fs.readFileSync(stack.prepared.configPath, "utf8");
    const withRefuse = cfg.includes("untrusted_messages:")
        ? cfg.replace(/untrusted_messages: \S+/, "untrusted_messages: refuse")
        : cfg.replace(/^encryption:\n/m, "encryption:\n  untrusted_messages: refuse\n");
    assert.notEqual(withRefuse, cfg, "the config now refuses untrusted messages");
    fs.writeFileSync(stack.prepared.configPath, withRefuse);
    await stack.restartFerry();
    await aliceUnsigned.sendText(roomA, "refused from the unverified device");
    await alice.sendText(roomA, "marker from the verified device");
    await copyOf("marker from the verified device");
    const inB = (await bob.events(roomB)).map((e) => e.content?.body ?? "");
    assert.ok(!inB.some((b) => b.endsWith("refused from the unverified device")), "the unverified device's message was not relayed");
});
