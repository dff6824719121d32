// Issue 2's end-to-end proof: Dendrite and ferry start from nothing; a js-sdk user invites the bot into an
// encrypted room and the bot joins; ferry's transaction endpoint records the events (as ciphertext); a restart
// of ferry, clean or SIGKILL, neither loses nor repeats them.
import assert from "node:assert/strict";
import fs from "node:fs";
import { after, before, test } from "node:test";
import { createUser } from "../lib/users.js";
import { command, inviteBot, startStack } from "../lib/stack.js";
import { pollUntil } from "../lib/util.js";

let stack;
let alice;
let mallory;
let roomId;
// mallory is only allowed to be relayed: the bot must decline her invites.
const malloryName = `mallory-${Math.random().toString(16).slice(2, 10)}`;

before(async () => {
    stack = await startStack({ permissions: { "*": "relay", "ferry.test": "user", [`@${malloryName}:ferry.test`]: "relay" } });
    alice = await createUser(stack.hs.url, "alice");
    mallory = await createUser(stack.hs.url, malloryName, { randomSuffix: false });
});

after(async () => {
    await Promise.all([alice?.stop(), mallory?.stop()]);
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

test("the bot declines, with a reason, an invite from a user whose permission does not allow it", async () => {
    const room = await mallory.createEncryptedRoom({ name: "not allowed" });
    await mallory.invite(room, stack.botUserId);
    await mallory.waitForMembership(room, stack.botUserId, "leave", 30000);
    // ferry sends its reason with the rejection; Dendrite 0.13.8 drops reasons on invite rejections (its /leave
    // path for pending invites ignores them), so the reason is checked where a server keeps it.
    const member = mallory.client.getRoom(room).currentState.getStateEvents("m.room.member", stack.botUserId);
    const reason = member.getContent().reason;
    if (reason !== undefined) assert.match(reason, /not allowed/);
    assert.ok(stack.ferry.logs().includes("Declining invite from a user without permission"));
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

test("ferry stops cleanly on SIGTERM and keeps secrets out of its log", async () => {
    const ferry = stack.ferry;
    const exit = await ferry.stop();
    assert.equal(exit.code, 0, `ferry exited ${JSON.stringify(exit)} on SIGTERM`);
    assert.ok(ferry.logs().includes("ferry stopped"), "the log says ferry stopped");
    // Secrets never reach the log.
    const logs = ferry.logs();
    for (const secret of [stack.prepared.asToken, stack.prepared.hsToken]) {
        assert.ok(secret && secret.length >= 32);
        assert.ok(!logs.includes(secret), "a token is in ferry's log");
    }
    const pickleKey = /pickle_key:\s*"?([^"\n]+)"?/.exec(fs.readFileSync(stack.prepared.configPath, "utf8"))[1];
    assert.ok(pickleKey.length >= 32 && pickleKey !== "generate", "the pickle key was generated and written back");
    assert.ok(!logs.includes(pickleKey), "the pickle key is in ferry's log");
    await stack.startFerryAgain();
});

test("the user query endpoint registers ghosts ferry would create, and only those", async () => {
    const base = `http://127.0.0.1:${stack.prepared.port}/_matrix/app/v1/users/`;
    const auth = { headers: { Authorization: `Bearer ${stack.prepared.hsToken}` } };
    const ghost = "@_ferry_someone=3aelsewhere.example:ferry.test";
    const res = await fetch(base + encodeURIComponent(ghost), auth);
    assert.equal(res.status, 200);
    // The homeserver now knows the ghost.
    const profile = await fetch(`${stack.hs.url}/_matrix/client/v3/profile/${encodeURIComponent(ghost)}`, { headers: { Authorization: `Bearer ${alice.accessToken}` } });
    assert.equal(profile.status, 200);
    const notOurs = await fetch(base + encodeURIComponent("@someone:ferry.test"), auth);
    assert.equal(notOurs.status, 404);
    assert.equal((await notOurs.json()).errcode, "M_NOT_FOUND");
    const noToken = await fetch(base + encodeURIComponent(ghost));
    assert.equal(noToken.status, 401);
});
