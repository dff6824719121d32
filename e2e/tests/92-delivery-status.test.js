// Issue 15, delivery status: when a message cannot be relayed into a room, its sender learns it in their own room,
// as their client renders it: a notice from the bot replying to the message, and com.beeper.message_send_status
// referencing it (FAIL_PERMANENT when ferry gave up, FAIL_RETRIABLE while it waits); when the message crosses
// later, the notice is redacted and the status becomes SUCCESS.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { createUser } from "../lib/users.js";
import { startClientProxy } from "../lib/proxy.js";
import { linkedPair, startStack } from "../lib/stack.js";

const T = 30000;
const STATUS = "com.beeper.message_send_status";
let stack, pair, alice, bob, roomA, roomB;

/** Waits in `roomId` for the bot's notice replying to `eventId` whose body matches `re`. */
function noticeReplyingTo(user, roomId, eventId, re, what) {
    return user.waitForEvent(
        roomId,
        (e) => e.sender === stack.botUserId && e.type === "m.room.message" && e.content.msgtype === "m.notice" &&
            e.content["m.relates_to"]?.["m.in_reply_to"]?.event_id === eventId && re.test(e.content.body),
        T,
        what,
    );
}

/** Waits in `roomId` for the bot's message status about `eventId` with `status`. */
function statusOf(user, roomId, eventId, status) {
    return user.waitForEvent(
        roomId,
        (e) => e.sender === stack.botUserId && e.type === STATUS && e.content["m.relates_to"]?.event_id === eventId && e.content.status === status,
        T,
        `status ${status} of ${eventId}`,
    );
}

before(async () => {
    stack = await startStack({ extraConfig: { bridge: { key_wait: "2s", key_notice_after: "3s" } } });
    pair = await linkedPair(stack, { names: ["Garden", "Kitchen"], users: [{ displayName: "Alice" }, { displayName: "Bob" }] });
    ({ alice, bob, roomA, roomB } = pair);
});

after(async () => {
    await pair?.stop();
    await stack?.stop();
});

test("a message the other room refuses: its sender gets a reply notice and FAIL_PERMANENT", async () => {
    // Kitchen lets only moderators speak: the homeserver refuses alice's ghost there.
    const pl = bob.client.getRoom(roomB).currentState.getStateEvents("m.room.power_levels", "").getContent();
    await bob.sendState(roomB, "m.room.power_levels", { ...pl, events_default: 50 });
    try {
        const refused = await alice.sendText(roomA, "this one is refused");
        const notice = await noticeReplyingTo(alice, roomA, refused, /could not relay this message to Kitchen: the homeserver answered M_FORBIDDEN/, "the refusal notice");
        assert.equal(notice.encrypted, true, "the notice is encrypted like the room");
        assert.equal(notice.event.replyEventId, refused, "alice's client renders it as a reply to her message");
        const status = await statusOf(alice, roomA, refused, "FAIL_PERMANENT");
        assert.equal(status.content.reason, "m.no_permission");
        assert.equal(status.content.network, "ferry");
    } finally {
        await bob.sendState(roomB, "m.room.power_levels", pl);
    }
});

test("a message whose room key comes late: notice and FAIL_RETRIABLE, then SUCCESS and the notice redacted", async () => {
    // carol's to-device messages go through a proxy that keeps them: ferry gets her room key only when let go.
    const proxy = await startClientProxy(stack.hs.port);
    const carol = await createUser(proxy.url, "carol", { displayName: "Carol" });
    try {
        await alice.invite(roomA, carol.userId);
        await carol.join(roomA);
        await carol.waitForMembership(roomA, stack.botUserId, "join");
        proxy.holdToDevice();
        const late = await carol.sendText(roomA, "my key comes late");
        const notice = await noticeReplyingTo(carol, roomA, late, /could not decrypt a message from/, "the missing-key notice");
        await statusOf(carol, roomA, late, "FAIL_RETRIABLE");
        await proxy.releaseToDevice();
        await bob.waitForText(roomB, "my key comes late", 60000);
        await carol.waitForEvent(roomA, (e) => e.eventId === notice.eventId && e.redacted, T, "the notice redacted");
        await statusOf(carol, roomA, late, "SUCCESS");
    } finally {
        await proxy.releaseToDevice().catch(() => {});
        await carol.stop();
        await proxy.close();
    }
});
