// Issue 12's end-to-end proof that what a stranger can make ferry do is bounded: a user flooding commands gets a
// burst of answers, not one per command; a device flooding undecryptable messages gets a few missing-key notices,
// not one per message.
import assert from "node:assert/strict";
import crypto from "node:crypto";
import { after, before, test } from "node:test";
import { createUser } from "../lib/users.js";
import { linkedPair, startStack } from "../lib/stack.js";
import { sleep } from "../lib/util.js";

let stack, alice, bob, roomA, roomB;

/** The bot's notices in roomId as user sees them. */
async function botNotices(user, roomId, pattern) {
    return (await user.events(roomId)).filter((e) => e.sender === stack.botUserId && pattern.test(e.content?.body ?? ""));
}

/** Waits until the count of matching bot notices stops growing for quietMs, and returns it. */
async function settledCount(user, roomId, pattern, quietMs, maxMs = 60000) {
    const start = Date.now();
    let last = -1;
    let since = Date.now();
    for (;;) {
        const n = (await botNotices(user, roomId, pattern)).length;
        if (n !== last) {
            last = n;
            since = Date.now();
        } else if (Date.now() - since >= quietMs || Date.now() - start > maxMs) {
            return n;
        }
        await sleep(250);
    }
}

before(async () => {
    // Missing-key notices after 1 s, so the test need not wait a minute.
    stack = await startStack({ extraConfig: { bridge: { key_notice_after: "1s", key_wait: "1s" } } });
    ({ alice, bob, roomA, roomB } = await linkedPair(stack, { names: ["Bounded A", "Bounded B"] }));
});

after(async () => {
    await Promise.all([alice?.stop(), bob?.stop()]);
    await stack?.stop();
});

test("a flood of commands gets a burst of answers, not one per command", async () => {
    const flood = 35;
    for (let i = 0; i < flood; i++) await bob.sendText(roomB, "!ferry ping");
    const answered = await settledCount(bob, roomB, /^Pong/, 6000);
    assert.ok(answered >= 5, `ferry answered at all (${answered})`);
    assert.ok(answered <= 22, `${answered} answers to ${flood} commands sent at once: the rate limit holds`);
});

test("a flood of undecryptable messages gets a few missing-key notices, not one each", async () => {
    const flood = 10;
    const mallory = await createUser(stack.hs.url, "mallory");
    try {
        await alice.invite(roomA, mallory.userId);
        await mallory.join(roomA);
        await alice.waitForMembership(roomA, mallory.userId, "join");
        // Ciphertext on Megolm sessions nobody ever shared: ferry parks each one waiting for a key that never comes.
        const b64 = (n) => crypto.randomBytes(n).toString("base64").replace(/=+$/, "");
        for (let i = 0; i < flood; i++) {
            const res = await mallory.sendRaw(roomA, "m.room.encrypted", {
                algorithm: "m.megolm.v1.aes-sha2",
                ciphertext: b64(120),
                session_id: b64(32),
                sender_key: b64(32),
                device_id: mallory.deviceId,
            });
            assert.equal(res.status, 200);
        }
        const told = await settledCount(alice, roomA, /could not decrypt a message from/, 12000, 90000);
        assert.ok(told >= 1, "the room is told");
        assert.ok(told <= 3, `${told} missing-key notices for ${flood} undecryptable messages`);
    } finally {
        await mallory.stop();
    }
});
