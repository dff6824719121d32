// Issue 3's end-to-end proof, part 1: real matrix-js-sdk users in separate encrypted rooms talk through ferry.
// Every message kind crosses in both directions, the receiving client decrypts it, and relations point at the
// receiving room's own events. Also: three-room links, the encrypted→unencrypted refusal, and no plaintext in
// ferry's database or logs afterwards.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { createUser } from "../lib/users.js";
import { command, inviteBot, startStack } from "../lib/stack.js";
import { decryptAttachment, download, encryptAttachment, upload } from "../lib/media.js";

let stack, alice, bob, carol, roomA, roomB;
const sentBodies = [];
const T = 30000;

const isGhost = (userId) => userId.startsWith("@_ferry_");
const relOf = (e) => e.content["m.relates_to"] ?? {};

/** Sends a text and records its body for the plaintext check at the end. */
async function say(user, roomId, body, extra = {}) {
    sentBodies.push(body);
    return user.sendText(roomId, body, extra);
}

/** Waits in `roomId` (as `user`) for the relayed copy of a message with this body. */
function copyOf(user, roomId, body) {
    return user.waitForEvent(roomId, (e) => isGhost(e.sender) && e.type === "m.room.message" && e.content.body === body, T, `the copy of "${body}"`);
}

before(async () => {
    stack = await startStack({ permissions: { "*": "relay", "ferry.test": "user" } });
    [alice, bob, carol] = await Promise.all(["alice", "bob", "carol"].map((n) => createUser(stack.hs.url, n, { displayName: n[0].toUpperCase() + n.slice(1) })));
    roomA = await alice.createEncryptedRoom({ name: "Room A" });
    roomB = await bob.createEncryptedRoom({ name: "Room B" });
    await inviteBot(stack, alice, roomA);
    await inviteBot(stack, bob, roomB);
});

after(async () => {
    await Promise.all([alice?.stop(), bob?.stop(), carol?.stop()]);
    await stack?.stop();
});

test("linking: a request in the room where the sender lacks power, accepted there", async () => {
    const req = await command(stack, alice, roomA, `!ferry link ${roomB}`);
    assert.match(req.content.body, /link request/i);
    await bob.waitForEvent(roomB, (e) => e.sender === stack.botUserId && /asks to link/.test(e.content.body ?? ""), T, "the link request notice");
    const accepted = await command(stack, bob, roomB, "!ferry accept");
    assert.match(accepted.content.body, /Linked/);
    const again = await command(stack, alice, roomA, `!ferry link ${roomB}`);
    assert.match(again.content.body, /already linked/);
    const self = await command(stack, alice, roomA, `!ferry link ${roomA}`);
    assert.match(self.content.body, /itself/);
    const notIn = await command(stack, alice, roomA, "!ferry link !nowhere:ferry.test");
    assert.match(notIn.content.body, /not in/);
});

test("text, HTML, notice and emote cross both ways, decrypted, from the sender's ghost", async () => {
    await say(alice, roomA, "hello from A");
    const copy = await copyOf(bob, roomB, "hello from A");
    assert.equal(copy.encrypted, true);
    assert.ok(isGhost(copy.sender));
    assert.equal(bob.client.getRoom(roomB).getMember(copy.sender)?.name, "Alice (Room A)");

    await say(bob, roomB, "hello from B");
    const back = await copyOf(alice, roomA, "hello from B");
    assert.equal(back.encrypted, true);

    sentBodies.push("bold move");
    await alice.sendEvent(roomA, "m.room.message", { msgtype: "m.text", body: "bold move", format: "org.matrix.custom.html", formatted_body: "<b>bold</b> move" });
    const html = await copyOf(bob, roomB, "bold move");
    assert.equal(html.content.formatted_body, "<b>bold</b> move");

    sentBodies.push("a notice from B", "waves from A");
    await bob.sendEvent(roomB, "m.room.message", { msgtype: "m.notice", body: "a notice from B" });
    assert.equal((await copyOf(alice, roomA, "a notice from B")).content.msgtype, "m.notice");
    await alice.sendEvent(roomA, "m.room.message", { msgtype: "m.emote", body: "waves from A" });
    assert.equal((await copyOf(bob, roomB, "waves from A")).content.msgtype, "m.emote");
});

test("replies, threads, edits, reactions and redactions point at the receiving room's events", async () => {
    const origA = await say(alice, roomA, "root message in A");
    const copyInB = await copyOf(bob, roomB, "root message in A");

    // bob replies to the copy in B; alice sees a reply to her original.
    await say(bob, roomB, "reply from B", { "m.relates_to": { "m.in_reply_to": { event_id: copyInB.eventId } } });
    const reply = await copyOf(alice, roomA, "reply from B");
    assert.equal(relOf(reply)["m.in_reply_to"]?.event_id, origA);

    // bob answers in a thread rooted at the copy; alice sees the thread rooted at her original.
    await say(bob, roomB, "thread reply from B", {
        "m.relates_to": { rel_type: "m.thread", event_id: copyInB.eventId, is_falling_back: true, "m.in_reply_to": { event_id: copyInB.eventId } },
    });
    const thread = await copyOf(alice, roomA, "thread reply from B");
    assert.equal(relOf(thread).rel_type, "m.thread");
    assert.equal(relOf(thread).event_id, origA);

    // alice edits her original; bob sees the edit of the copy.
    sentBodies.push("root message in A, edited");
    await alice.edit(roomA, origA, "root message in A, edited");
    const edit = await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && relOf(e).rel_type === "m.replace", T, "the relayed edit");
    assert.equal(relOf(edit).event_id, copyInB.eventId);
    assert.equal(edit.content["m.new_content"].body, "root message in A, edited");

    // bob reacts to the copy (js-sdk sends reactions unencrypted); alice sees it on her original, encrypted.
    await bob.react(roomB, copyInB.eventId, "👍");
    const reaction = await alice.waitForEvent(roomA, (e) => isGhost(e.sender) && e.type === "m.reaction", T, "the relayed reaction");
    assert.equal(relOf(reaction).event_id, origA);
    assert.equal(relOf(reaction).key, "👍");
    assert.equal(reaction.encrypted, true, "ferry encrypts the copy of an unencrypted reaction");

    // alice redacts her original; the copy in B is redacted.
    const doomed = await say(alice, roomA, "this will be redacted");
    const doomedCopy = await copyOf(bob, roomB, "this will be redacted");
    await alice.redact(roomA, doomed);
    await bob.waitForEvent(roomB, (e) => e.eventId === doomedCopy.eventId && e.redacted, T, "the copy to be redacted");
});

test("mentions map real users to ghosts and ghosts back to real users", async () => {
    // bob has spoken, so his ghost is in room A; alice mentions the ghost the way Element would.
    const bobGhost = alice.client.getRoom(roomA).getJoinedMembers().map((m) => m.userId).find((u) => isGhost(u) && u.includes("bob"));
    assert.ok(bobGhost, "bob's ghost is in room A");
    const body = "ping Bob (Room B)";
    sentBodies.push(body);
    await alice.sendEvent(roomA, "m.room.message", {
        msgtype: "m.text",
        body,
        format: "org.matrix.custom.html",
        formatted_body: `ping <a href="https://matrix.to/#/${bobGhost}">Bob (Room B)</a>`,
        "m.mentions": { user_ids: [bobGhost] },
    });
    const got = await copyOf(bob, roomB, body);
    assert.deepEqual(got.content["m.mentions"].user_ids, [bob.userId]);
    assert.ok(got.content.formatted_body.includes(`https://matrix.to/#/${bob.userId}`), got.content.formatted_body);
});

test("an encrypted file crosses with its file object unchanged and decrypts on the other side", async () => {
    const bytes = Buffer.from("ferry test attachment " + "x".repeat(1000));
    const { ciphertext, file } = encryptAttachment(bytes);
    file.url = await upload(alice, ciphertext);
    sentBodies.push("notes.txt");
    await alice.sendEvent(roomA, "m.room.message", { msgtype: "m.file", body: "notes.txt", file, info: { mimetype: "text/plain", size: bytes.length } });
    const got = await copyOf(bob, roomB, "notes.txt");
    assert.deepEqual(got.content.file, file);
    assert.deepEqual(decryptAttachment(await download(bob, got.content.file.url), got.content.file), bytes);
});

test("a three-room link delivers every message to the two other rooms exactly once", async () => {
    const roomC = await carol.createEncryptedRoom({ name: "Room C" });
    await inviteBot(stack, carol, roomC);
    // Room C joins the A–B link: both A and B must consent (the link boundary, issue 12).
    const req = await command(stack, carol, roomC, `!ferry link ${roomA}`);
    assert.match(req.content.body, /link request/i);
    const waiting = await command(stack, alice, roomA, "!ferry accept");
    assert.match(waiting.content.body, /still waits for consent in Room B/);
    const accepted = await command(stack, bob, roomB, "!ferry accept");
    assert.match(accepted.content.body, /^Linked/);

    await say(carol, roomC, "hello from C");
    await copyOf(alice, roomA, "hello from C");
    await copyOf(bob, roomB, "hello from C");
    await say(bob, roomB, "B to everyone");
    await copyOf(alice, roomA, "B to everyone");
    await copyOf(carol, roomC, "B to everyone");
    // A marker after the others: once it arrived, any duplicate of the earlier ones would have too.
    await say(alice, roomA, "A marker");
    await copyOf(carol, roomC, "A marker");
    await copyOf(bob, roomB, "A marker");
    const count = async (user, roomId, body) => (await user.events(roomId)).filter((e) => e.content?.body === body).length;
    assert.equal(await count(alice, roomA, "hello from C"), 1);
    assert.equal(await count(bob, roomB, "hello from C"), 1);
    assert.equal(await count(alice, roomA, "B to everyone"), 1);
    assert.equal(await count(carol, roomC, "B to everyone"), 1);
    assert.equal(await count(bob, roomB, "A marker"), 1);
});

test("linking an encrypted room with an unencrypted one is refused by default", async () => {
    const plain = await carol.createRoom({ name: "Plain room", encrypted: false });
    await inviteBot(stack, carol, plain);
    const refused = await command(stack, carol, plain, `!ferry link ${roomA}`);
    assert.match(refused.content.body, /not encrypted/);
});

test("no message body reaches ferry's database or logs", async () => {
    const dump = stack.dump();
    const logs = stack.ferry.logs();
    assert.ok(dump.length > 1000 && logs.length > 1000, "the dump and the logs are not empty");
    for (const body of sentBodies) {
        assert.ok(!dump.includes(body), `database dump contains "${body}"`);
        assert.ok(!logs.includes(body), `ferry's log contains "${body}"`);
    }
});
