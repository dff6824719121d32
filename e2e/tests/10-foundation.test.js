// Issue 2's end-to-end proof: Dendrite and ferry start from nothing; a js-sdk user invites the bot into an
// encrypted room and the bot joins; ferry's transaction endpoint records the events (as ciphertext); a restart
// of ferry, clean or SIGKILL, neither loses nor repeats them.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { createUser } from "../lib/users.js";
import { command, inviteBot, startStack } from "../lib/stack.js";
import { pollUntil } from "../lib/util.js";

let stack;
let alice;
let roomId;

before(async () => {
    stack = await startStack({ permissions: { "*": "relay", "ferry.test": "user" } });
    alice = await createUser(stack.hs.url, "alice");
});

after(async () => {
    await alice?.stop();
    await stack?.stop();
});

const recorded = (ids) => {
    const list = ids.map((i) => `'${i}'`).join(",");
    return new Map(stack.sql(`SELECT event_id, count(*) FROM inbox WHERE event_id IN (${list}) GROUP BY event_id`).map(([id, n]) => [id, Number(n)]));
};

test("the bot joins an encrypted room when a permitted user invites it", async () => {
    roomId = await alice.createEncryptedRoom({ name: "foundation" });
    await inviteBot(stack, alice, roomId);
    // The membership events reached ferry through its transaction endpoint and were recorded.
    const joins = stack.sql(`SELECT count(*) FROM inbox WHERE room_id='${roomId}' AND event_type='m.room.member'`);
    assert.ok(Number(joins[0][0]) >= 2, "the invite and the bot's join are in the inbox");
});

test("transactions are recorded as ciphertext, exactly once", async () => {
    const ids = [];
    for (const body of ["first secret words", "second secret words"]) ids.push(await alice.sendText(roomId, body));
    await pollUntil(() => recorded(ids).size === ids.length, { timeoutMs: 20000, what: "ferry to record both events" });
    for (const [id, n] of recorded(ids)) assert.equal(n, 1, `${id} recorded once`);
    const dump = stack.dump();
    assert.ok(!dump.includes("secret words"), "no message body in ferry's database");
});

test("a restart (clean, then SIGKILL) neither loses nor repeats events", async () => {
    // A command is handled once: its reply count shows whether ferry processed an event twice.
    const reply1 = await command(stack, alice, roomId, "!ferry frobnicate");
    assert.match(reply1.content.body, /Unknown command/);

    await stack.stopFerry();
    const whileDown = await alice.sendText(roomId, "sent while ferry was down");
    await stack.startFerryAgain();
    await pollUntil(() => recorded([whileDown]).get(whileDown) === 1, { timeoutMs: 90000, what: "Dendrite to redeliver the event sent while ferry was down" });

    const cmd2 = await alice.sendText(roomId, "!ferry frobnicate again");
    await stack.restartFerry({ kill: true });
    await alice.waitForEvent(
        roomId,
        (e) => e.sender === stack.botUserId && e.content["m.relates_to"]?.["m.in_reply_to"]?.event_id === cmd2,
        90000,
        "the reply to the command sent just before SIGKILL",
    );
    // Give a redelivery the chance to double-process, then count.
    const probe = await alice.sendText(roomId, "!ferry frobnicate probe");
    await alice.waitForEvent(roomId, (e) => e.sender === stack.botUserId && e.content["m.relates_to"]?.["m.in_reply_to"]?.event_id === probe, 30000, "the probe reply");
    const events = await alice.events(roomId);
    const repliesTo = (id) => events.filter((e) => e.sender === stack.botUserId && e.content["m.relates_to"]?.["m.in_reply_to"]?.event_id === id).length;
    assert.equal(repliesTo(reply1.content["m.relates_to"]["m.in_reply_to"].event_id), 1, "first command answered once");
    assert.equal(repliesTo(cmd2), 1, "command around the SIGKILL answered once");
    const rec = recorded([whileDown, cmd2, probe]);
    for (const id of [whileDown, cmd2, probe]) assert.equal(rec.get(id), 1, `${id} recorded exactly once`);
});
