// Issue 15, read receipts and typing: a member's public read receipt and typing notification in one room appear in
// the linked room from their ghost, as the receiving client renders them (the "read by" avatars and "… is
// typing"); private receipts stay private; a member whose ghost is not in the other room shows nothing there (and
// gets no ghost for it). On Synapse they arrive as appservice ephemeral events (receive_ephemeral), on Dendrite
// through the bot's /sync.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { ReceiptType } from "matrix-js-sdk";
import { createUser } from "../lib/users.js";
import { linkedPair, startStack } from "../lib/stack.js";
import { pollUntil } from "../lib/util.js";

const T = 30000;
let stack, pair, alice, bob, carol, roomA, roomB, aliceGhost, bobGhost;

/** The event alice's client shows `user` has read up to in room A (public receipts only). */
const readUpTo = (user) => alice.client.getRoom(roomA).getEventReadUpTo(user, true);

before(async () => {
    stack = await startStack();
    pair = await linkedPair(stack, { names: ["Garden", "Kitchen"], users: [{ displayName: "Alice" }, { displayName: "Bob" }] });
    ({ alice, bob, roomA, roomB } = pair);
    carol = await createUser(stack.hs.url, "carol", { displayName: "Carol" });
    await bob.invite(roomB, carol.userId);
    await carol.join(roomB);
    // Both speak once, so that each one's ghost is in the other room.
    await alice.sendText(roomA, "hello kitchen");
    aliceGhost = (await bob.waitForText(roomB, "hello kitchen", T)).sender;
    await bob.sendText(roomB, "hello garden");
    bobGhost = (await alice.waitForText(roomA, "hello garden", T)).sender;
});

after(async () => {
    await Promise.all([pair?.stop(), carol?.stop()]);
    await stack?.stop();
});

test("a public read receipt crosses from the reader's ghost, on the original of what they read", async () => {
    const original = await alice.sendText(roomA, "did you read this?");
    const copy = await bob.waitForText(roomB, "did you read this?", T);
    await bob.client.sendReadReceipt(copy.event, ReceiptType.Read);
    await pollUntil(() => readUpTo(bobGhost) === original, { timeoutMs: T, what: "alice's client to show bob's ghost read her message" });
    const readers = alice.client.getRoom(roomA).getUsersReadUpTo(alice.client.getRoom(roomA).findEventById(original));
    assert.ok(readers.includes(bobGhost), `read by ${readers}`);
});

test("private read receipts stay private", async () => {
    const seen = [];
    const room = alice.client.getRoom(roomA);
    const onReceipt = () => seen.push(room.getEventReadUpTo(bobGhost, true));
    alice.client.on("Room.receipt", onReceipt);
    try {
        const first = await alice.sendText(roomA, "first of two");
        const second = await alice.sendText(roomA, "second of two");
        const firstCopy = await bob.waitForText(roomB, "first of two", T);
        const secondCopy = await bob.waitForText(roomB, "second of two", T);
        // The later message read privately, then the earlier one publicly: only the public one crosses.
        await bob.client.sendReadReceipt(secondCopy.event, ReceiptType.ReadPrivate);
        await bob.client.sendReadReceipt(firstCopy.event, ReceiptType.Read);
        await pollUntil(() => readUpTo(bobGhost) === first, { timeoutMs: T, what: "bob's ghost reading the first message" });
        assert.ok(!seen.includes(second), "the private receipt crossed");
    } finally {
        alice.client.off("Room.receipt", onReceipt);
    }
});

test("typing crosses from the typist's ghost, and stops", async () => {
    await bob.client.sendTyping(roomB, true, 30000);
    await pollUntil(() => alice.client.getRoom(roomA).getMember(bobGhost)?.typing === true, { timeoutMs: T, what: "bob's ghost typing in alice's client" });
    await bob.client.sendTyping(roomB, false);
    await pollUntil(() => alice.client.getRoom(roomA).getMember(bobGhost)?.typing === false, { timeoutMs: T, what: "bob's ghost to stop typing" });
});

test("a member whose ghost is not in the other room shows nothing there, and gets no ghost for it", async () => {
    const original = await alice.sendText(roomA, "carol reads this");
    const copy = await carol.waitForText(roomB, "carol reads this", T);
    await carol.client.sendTyping(roomB, true, 30000);
    await carol.client.sendReadReceipt(copy.event, ReceiptType.Read);
    // ferry relays ephemeral events in order: once bob's later typing shows, carol's came and went.
    await bob.client.sendTyping(roomB, true, 30000);
    await pollUntil(() => alice.client.getRoom(roomA).getMember(bobGhost)?.typing === true, { timeoutMs: T, what: "bob's ghost typing" });
    await bob.client.sendTyping(roomB, false);
    const room = alice.client.getRoom(roomA);
    assert.equal(room.getMembers().filter((m) => m.userId !== alice.userId && ![bobGhost, stack.botUserId].includes(m.userId)).length, 0, "no other ghost joined");
    assert.ok(!room.getUsersReadUpTo(room.findEventById(original)).some((u) => u !== alice.userId && u !== bobGhost && u !== stack.botUserId));
    assert.ok(aliceGhost, "alice's ghost exists in Kitchen");
});
