// Issue 15, room upgrades: when a linked room is upgraded, ferry joins the room that replaces it (asking to be
// invited when it cannot join), moves the link there, writes its room state there, announces the move in every
// room, and keeps relations to messages from before the upgrade working. Both homeservers mute the old room on an
// upgrade (only moderators may speak there), so a ghost's edit or reaction of an old message is restated in the
// new room with a link to it, the bot redacts old copies, and what a moderator does in the old room still
// crosses; a reply to an old message arrives in the new room with a link to it.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { createUser } from "../lib/users.js";
import { command, inviteBot, linkByRequest, startStack } from "../lib/stack.js";

const T = 30000;
let stack, alice, bob, roomA, roomB, roomA2, roomB2;
let aliceOld, aliceOldInB, bobOld, bobOldInA, aliceGhost, bobGhost;

const fromBot = (re) => (e) => e.sender === stack.botUserId && e.type === "m.room.message" && re.test(e.content.body ?? "");

/** Upgrades a room to the version it has (each homeserver's default), as Element's upgrade dialog can. */
async function upgrade(user, roomId) {
    const version = user.client.getRoom(roomId).getVersion();
    const { replacement_room } = await user.client.upgradeRoom(roomId, version);
    return replacement_room;
}

/** Tells whether HTML links to an event of a room (a matrix.to permalink, percent-encoded or not). */
function linksTo(html, roomId, eventId) {
    const hrefs = [...(html ?? "").matchAll(/href="([^"]*)"/g)].map((m) => decodeURIComponent(m[1].replaceAll("&amp;", "&")));
    return hrefs.some((h) => h.startsWith(`https://matrix.to/#/${roomId}/${eventId}`));
}

/** Reads a state event through the client-server API, as bob's or alice's client would. */
async function stateEvent(user, roomId, type, stateKey = "") {
    const res = await fetch(`${stack.hs.url}/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/state/${encodeURIComponent(type)}/${encodeURIComponent(stateKey)}`, {
        headers: { authorization: `Bearer ${user.accessToken}` },
    });
    return res.status === 200 ? res.json() : null;
}

before(async () => {
    stack = await startStack();
    [alice, bob] = await Promise.all([
        createUser(stack.hs.url, "alice", { displayName: "Alice" }),
        createUser(stack.hs.url, "bob", { displayName: "Bob" }),
    ]);
    roomA = await alice.createEncryptedRoom({ name: "Garden" });
    // Kitchen is public: ferry can join the room that replaces it without an invite.
    roomB = await bob.createEncryptedRoom({ name: "Kitchen", preset: "public_chat" });
    await inviteBot(stack, alice, roomA);
    await inviteBot(stack, bob, roomB);
    await linkByRequest(stack, alice, roomA, bob, roomB);
    aliceOld = await alice.sendText(roomA, "before the upgrade");
    const a = await bob.waitForText(roomB, "before the upgrade", T);
    aliceOldInB = a.eventId;
    aliceGhost = a.sender;
    bobOld = await bob.sendText(roomB, "bob before the upgrade");
    const b = await alice.waitForText(roomA, "bob before the upgrade", T);
    bobOldInA = b.eventId;
    bobGhost = b.sender;
});

after(async () => {
    await Promise.all([alice?.stop(), bob?.stop()]);
    await stack?.stop();
});

test("an upgrade into an invite-only room: ferry asks to be invited, then moves the link and announces it", async () => {
    roomA2 = await upgrade(alice, roomA);
    await alice.waitForEvent(roomA, fromBot(/Invite me/), T, "ferry asking to be invited into the new room");
    await alice.waitForRoom(roomA2, { encrypted: true });
    await alice.invite(roomA2, stack.botUserId);
    await alice.waitForMembership(roomA2, stack.botUserId, "join", T);
    await alice.waitForEvent(roomA2, fromBot(/This room replaces Garden/), T, "the announcement in the new room");
    await bob.waitForEvent(roomB, fromBot(/Garden was upgraded to a new room/), T, "the announcement in Kitchen");
    await alice.waitForEvent(roomA, fromBot(/link moved into the room that replaced it/), T, "the announcement in the old room");
    // ferry's room state is in the new room: Element shows the bridge, and counts the bot as a service member.
    const functional = await stateEvent(alice, roomA2, "io.element.functional_members");
    assert.ok(functional?.service_members?.includes(stack.botUserId), `functional members: ${JSON.stringify(functional)}`);
    const link = stack.sql(`SELECT link_id FROM link_room WHERE room_id='${roomA2}'`);
    assert.equal(link.length, 1, "the new room belongs to the link");
    const bridge = await stateEvent(alice, roomA2, "m.bridge", `im.ferry://${link[0][0]}`);
    assert.equal(bridge?.channel?.id, link[0][0]);
});

test("messages cross between the new room and the other room, from the same ghosts under their names", async () => {
    await alice.sendText(roomA2, "after the upgrade");
    const copy = await bob.waitForText(roomB, "after the upgrade", T);
    assert.equal(copy.sender, aliceGhost, "the same ghost speaks for alice");
    await bob.sendText(roomB, "bob after the upgrade");
    const back = await alice.waitForText(roomA2, "bob after the upgrade", T);
    assert.equal(back.sender, bobGhost);
    assert.equal(alice.client.getRoom(roomA2).getMember(bobGhost).name, "Bob (Kitchen)", "alice's client shows bob's ghost by name in the new room");
    const join = (await alice.events(roomA2)).find((e) => e.type === "m.room.member" && e.stateKey === bobGhost && e.content.membership === "join");
    assert.equal(join?.content.displayname, "Bob (Kitchen)", "the ghost joined the new room with its name");
});

test("edits, reactions and redactions of messages from before the upgrade still reach the other side", async () => {
    const link = (roomId, eventId) => (html) => linksTo(html, roomId, eventId);
    // bob's ghost may not speak in the muted old room: his reaction is restated in the new room.
    await bob.react(roomB, aliceOldInB, "👍");
    const reaction = await alice.waitForEvent(roomA2, (e) => e.type === "m.room.message" && e.content.msgtype === "m.emote" && /reacted 👍 to/.test(e.content.body), T, "bob's reaction, restated");
    assert.equal(reaction.sender, bobGhost);
    assert.ok(link(roomA, aliceOld)(reaction.content.formatted_body), reaction.content.formatted_body);
    await bob.edit(roomB, bobOld, "bob before the upgrade, edited");
    const edit = await alice.waitForEvent(roomA2, (e) => e.type === "m.room.message" && e.content.body?.endsWith("bob before the upgrade, edited"), T, "bob's edit, restated");
    assert.equal(edit.sender, bobGhost);
    assert.ok(link(roomA, bobOldInA)(edit.content.formatted_body), edit.content.formatted_body);
    // alice, the old room's creator, may still act there: her reaction to bob's old message crosses to Kitchen.
    await alice.react(roomA, bobOldInA, "🎉");
    const back = await bob.waitForEvent(roomB, (e) => e.type === "m.reaction" && e.content["m.relates_to"]?.event_id === bobOld, T, "alice's reaction from the old room");
    assert.equal(back.sender, aliceGhost);
    // bob redacts his old message: its copy in the old room goes (redacted by the bot, a moderator there).
    await bob.redact(roomB, bobOld);
    await alice.waitForEvent(roomA, (e) => e.eventId === bobOldInA && e.redacted, T, "the copy in the old room redacted");
});

test("a reply to a message from before the upgrade arrives in the new room with a link to it", async () => {
    await bob.sendText(roomB, "answering late", { "m.relates_to": { "m.in_reply_to": { event_id: aliceOldInB } } });
    const reply = await alice.waitForEvent(roomA2, (e) => e.type === "m.room.message" && e.content.body?.endsWith("answering late"), T, "bob's late reply");
    assert.equal(reply.content["m.relates_to"], undefined, "no reply relation the client could not load in this room");
    assert.ok(linksTo(reply.content.formatted_body, roomA, aliceOld), reply.content.formatted_body);
});

test("an upgrade of a room ferry may join: the link follows at once and keeps the disappearing timer", async () => {
    const asked = await command(stack, alice, roomA2, "!ferry disappear 1h");
    assert.match(asked.content.body, /consent/);
    await bob.waitForEvent(roomB, fromBot(/asks to make messages disappear/), T, "the timer request");
    const accepted = await command(stack, bob, roomB, "!ferry accept");
    assert.match(accepted.content.body, /Disappearing messages are on/);
    roomB2 = await upgrade(bob, roomB);
    await bob.waitForRoom(roomB2, { encrypted: true });
    await bob.waitForEvent(roomB2, fromBot(/This room replaces Kitchen/), T, "the announcement in the new Kitchen");
    await alice.waitForEvent(roomA2, fromBot(/Kitchen was upgraded to a new room/), T, "the announcement in the new Garden");
    const timer = await stateEvent(bob, roomB2, "com.beeper.disappearing_timer");
    assert.deepEqual(timer, { type: "after_send", timer: 3600000 });
    await alice.waitForMembership(roomA2, bobGhost, "join", T);
    await bob.sendText(roomB2, "from the new kitchen");
    const copy = await alice.waitForText(roomA2, "from the new kitchen", T);
    assert.equal(copy.sender, bobGhost);
    await bob.waitForMembership(roomB2, stack.botUserId, "join", T);
    await alice.sendText(roomA2, "to the new kitchen");
    const there = await bob.waitForText(roomB2, "to the new kitchen", T);
    assert.equal(there.sender, aliceGhost);
    assert.equal(bob.client.getRoom(roomB2).getMember(aliceGhost).name, "Alice (Garden)");
});
