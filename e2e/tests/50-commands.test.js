// Issue 5's end-to-end proof: administration through bot commands. matrix-js-sdk users in encrypted rooms on
// Dendrite read the bot's decrypted replies: an admin links, lists and unlinks rooms; an unprivileged user's link
// is refused with the reason; help differs by permission level; status reflects a relayed message; m.bridge and
// io.element.functional_members appear after linking and go after unlinking; a management room takes commands
// without the prefix; reload applies edited permissions; where the bot lacks power, the room is told once.
import assert from "node:assert/strict";
import fs from "node:fs";
import { after, before, test } from "node:test";
import { createUser } from "../lib/users.js";
import { command, inviteBot, startStack } from "../lib/stack.js";

const T = 30000;
const suffix = Math.random().toString(16).slice(2, 10);
const adminName = `admin-${suffix}`;
const relayName = `relayonly-${suffix}`;

let stack, admin, bob, mallory, roomA, roomB;

const isGhost = (userId) => userId.startsWith("@_ferry_");

/** The room's current state events of one type, straight from the homeserver. */
async function stateOf(user, roomId, type) {
    return (await user.client.roomState(roomId)).filter((e) => e.type === type);
}

/** Asserts a reply is an encrypted, HTML-formatted m.notice that mentions nobody, and returns its plain body. */
function replyBody(reply) {
    assert.equal(reply.encrypted, true, "the reply is encrypted");
    assert.equal(reply.content.msgtype, "m.notice");
    assert.equal(reply.content.format, "org.matrix.custom.html");
    assert.ok(reply.content.formatted_body.length > 0);
    assert.deepEqual(reply.content["m.mentions"], {});
    return reply.content.body;
}

before(async () => {
    stack = await startStack({
        permissions: { "*": "relay", "ferry.test": "user", [`@${relayName}:ferry.test`]: "relay" },
        admins: [`@${adminName}:ferry.test`],
    });
    [admin, bob, mallory] = await Promise.all([
        createUser(stack.hs.url, adminName, { randomSuffix: false, displayName: "Admin" }),
        createUser(stack.hs.url, "bob", { displayName: "Bob" }),
        createUser(stack.hs.url, relayName, { randomSuffix: false, displayName: "Mallory" }),
    ]);
    roomA = await admin.createEncryptedRoom({ name: "Commands A" });
    roomB = await bob.createEncryptedRoom({ name: "Commands B" });
    // inviteBot gives the bot moderator power (50), which is all ferry needs.
    await inviteBot(stack, admin, roomA);
    await inviteBot(stack, bob, roomB);
});

after(async () => {
    await Promise.all([admin?.stop(), bob?.stop(), mallory?.stop()]);
    await stack?.stop();
});

test("a management room takes commands without the prefix, and with it", async () => {
    // A room holding only the admin and the bot, and not linked, is a management room. (Its own room: users who
    // join a room later see its earlier messages as undecryptable, and js-sdk then keeps 5-minute timers alive.)
    const dm = await admin.createEncryptedRoom({ name: "ferry admin" });
    await inviteBot(stack, admin, dm);
    const pong = await command(stack, admin, dm, "ping");
    assert.match(replyBody(pong), /^Pong/);
    const version = await command(stack, admin, dm, "!ferry version");
    assert.match(replyBody(version), /^ferry \S+/);
    const unknown = await command(stack, admin, dm, "hello there");
    assert.match(replyBody(unknown), /Unknown command `hello`\. Try `help`/);
    // An admin in an encrypted DM gets the recovery key, or is told when it will exist.
    const key = await command(stack, admin, dm, "recovery-key");
    assert.match(replyBody(key), /^ferry's recovery key: `[^`]+`|once ferry's cross-signing is set up/);
    const usage = await command(stack, admin, dm, "help link");
    assert.match(replyBody(usage), /`link <room> \[room\]`/);
    assert.match(usage.content.body, /Example: `link #team:example\.org`/);
});

test("help lists what each sender may run here", async () => {
    await admin.invite(roomA, bob.userId);
    await bob.join(roomA);
    await admin.waitForMembership(roomA, bob.userId, "join");
    const adminReply = await command(stack, admin, roomA, "!ferry help");
    const adminHelp = replyBody(adminReply);
    const bobHelp = replyBody(await command(stack, bob, roomA, "!ferry help"));
    assert.notEqual(adminHelp, bobHelp);
    for (const cmd of ["link", "accept", "links", "status", "encryption", "devices", "ping", "version"]) {
        assert.match(adminHelp, new RegExp(`- \`!ferry ${cmd}\\b`), `admin help lists ${cmd}`);
        assert.match(bobHelp, new RegExp(`- \`!ferry ${cmd}\\b`), `user help lists ${cmd}`);
    }
    for (const cmd of ["rotate", "reload"]) {
        assert.match(adminHelp, new RegExp(`- \`!ferry ${cmd}\``), `admin help lists ${cmd}`);
        assert.doesNotMatch(bobHelp, new RegExp(`!ferry ${cmd}`), `user help hides ${cmd}`);
    }
    // Room A is not linked yet, and not a DM any more: neither unlink nor recovery-key applies here.
    assert.doesNotMatch(adminHelp, /unlink|recovery-key/);
    assert.match(adminReply.content.formatted_body, /<strong>Linking rooms<\/strong><ul><li><code>!ferry link &lt;room&gt; \[room\]<\/code>/);
});

test("commands from users without the level or the power are refused, saying why", async () => {
    // bob has power 0 in room A: a user-level sender, but without the power to change room settings.
    const noPower = await command(stack, bob, roomA, `!ferry link ${roomB}`);
    assert.match(replyBody(noPower), /you need the power to change room settings here/);
    const rotate = await command(stack, bob, roomA, "!ferry rotate");
    assert.match(replyBody(rotate), /`rotate` needs permission level `admin`; yours is `user`/);

    // mallory may only be relayed: every command tells her which level is needed.
    await bob.invite(roomB, mallory.userId);
    await mallory.join(roomB);
    await bob.waitForMembership(roomB, mallory.userId, "join");
    const relay = await command(stack, mallory, roomB, `!ferry link ${roomA}`);
    assert.match(replyBody(relay), /need permission level `user`; yours is `relay`/);

    const unknown = await command(stack, bob, roomA, "!ferry frobnicate");
    assert.match(replyBody(unknown), /Unknown command `frobnicate`\. Try `!ferry help`/);
    const usage = await command(stack, bob, roomA, "!ferry link");
    assert.match(replyBody(usage), /^Usage: `!ferry link <room> \[room\]`/);
});

test("reload re-reads the permissions from the config without a restart", async () => {
    const cfg = fs.readFileSync(stack.prepared.configPath, "utf8");
    const entry = `"@${relayName}:ferry.test": "relay"`;
    assert.ok(cfg.includes(entry), "the config lists mallory as relay");
    fs.writeFileSync(stack.prepared.configPath, cfg.replace(entry, `"@${relayName}:ferry.test": "user"`));
    const userReload = replyBody(await command(stack, bob, roomA, "!ferry reload"));
    assert.match(userReload, /`reload` needs permission level `admin`; yours is `user`/);
    const reloaded = replyBody(await command(stack, admin, roomA, "!ferry reload"));
    assert.match(reloaded, /^Reloaded the permissions from the config: \d+ entries\. Your level is now `admin`\./);
    const pong = replyBody(await command(stack, mallory, roomB, "!ferry ping"));
    assert.match(pong, /^Pong/);
    // Back to relay, so the rest of the file sees the levels it started with.
    fs.writeFileSync(stack.prepared.configPath, cfg);
    assert.match(replyBody(await command(stack, admin, roomA, "!ferry reload")), /^Reloaded/);
});

test("an admin links rooms; m.bridge and functional members appear in both", async () => {
    const linked = await command(stack, admin, roomA, `!ferry link ${roomB}`);
    assert.match(replyBody(linked), /^Linked: Commands A, Commands B\./);
    await bob.waitForEvent(roomB, (e) => e.sender === stack.botUserId && /now linked with/.test(e.content.body ?? ""), T, "the link announcement");

    const [linkId] = stack.sql("SELECT id FROM link")[0];
    for (const [user, roomId, other] of [[admin, roomA, "Commands B"], [bob, roomB, "Commands A"]]) {
        const bridges = await stateOf(user, roomId, "m.bridge");
        assert.equal(bridges.length, 1, "one m.bridge event");
        assert.equal(bridges[0].state_key, `im.ferry://${linkId}`);
        assert.equal(bridges[0].content.bridgebot, stack.botUserId);
        assert.equal(bridges[0].content.channel.id, linkId);
        assert.equal(bridges[0].content.channel.displayname, other);
        assert.equal(bridges[0].content.protocol.id, "ferry");
        const halfShot = await stateOf(user, roomId, "uk.half-shot.bridge");
        assert.deepEqual(halfShot[0]?.content, bridges[0].content);
        const functional = await stateOf(user, roomId, "io.element.functional_members");
        assert.deepEqual(functional[0]?.content.service_members, [stack.botUserId]);
    }
});

test("links and status describe the link, and status reflects a relayed message", async () => {
    const links = replyBody(await command(stack, bob, roomB, "!ferry links"));
    assert.match(links, /- Commands A: encrypted, 0 copies relayed out of it/);
    assert.match(links, /- Commands B \(this room\): encrypted/);
    assert.match(links, /Policy: encryption is not required/);

    const before = replyBody(await command(stack, admin, roomA, "!ferry status"));
    assert.match(before, /^ferry \S+ · up \d/);
    assert.match(before, /Encryption: \S+/);
    assert.match(before, /✅ Commands A \(here\)\nnothing relayed yet\n/);

    await admin.sendText(roomA, "relayed for status");
    await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.content.body === "relayed for status", T, "the relayed message");
    const after = replyBody(await command(stack, admin, roomA, "!ferry status"));
    assert.match(after, /✅ Commands A \(here\)\nlast relayed \d+(s|m \d+s) ago\n/);
    assert.match(after, /All links \(1, with 2 rooms\)/, "admins get the global figures");
    const userStatus = replyBody(await command(stack, bob, roomB, "!ferry status"));
    assert.doesNotMatch(userStatus, /All links/, "users get only their link");
    const counted = replyBody(await command(stack, bob, roomB, "!ferry links"));
    assert.match(counted, /- Commands A: encrypted, 1 copies relayed out of it/);
});

test("encryption shows the policy; only room admins may require it", async () => {
    const shown = replyBody(await command(stack, bob, roomB, "!ferry encryption"));
    assert.match(shown, /^This room is encrypted\./);
    assert.match(shown, /- Commands A: encrypted/);
    // bob has power 0 in room A.
    const refused = replyBody(await command(stack, bob, roomA, "!ferry encryption require"));
    assert.match(refused, /you need the power to change power levels here \(power level ≥ 100; you have 0\)/);
    const done = replyBody(await command(stack, bob, roomB, "!ferry encryption require"));
    assert.match(done, /now requires encryption/);
    const policy = replyBody(await command(stack, admin, roomA, "!ferry links"));
    assert.match(policy, /Policy: every room of this link must be encrypted/);
    const bad = replyBody(await command(stack, admin, roomA, "!ferry encryption maybe"));
    assert.match(bad, /^Usage: `!ferry encryption \[require\|optional\]`/);
});

test("devices and rotate answer an admin", async () => {
    const devices = replyBody(await command(stack, admin, roomA, "!ferry devices"));
    assert.match(devices, /My device: `[^`]+`/);
    assert.match(devices, /Device mode: `per_ghost`/);
    const rotated = replyBody(await command(stack, admin, roomA, "!ferry rotate"));
    assert.match(rotated, /next message in this room is encrypted with new keys/);
    // ferry still relays after rotating.
    await admin.sendText(roomA, "after rotation");
    await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.content.body === "after rotation", T, "the message after rotation");
});

test("an admin unlinks; m.bridge is emptied and the bot leaves the functional members", async () => {
    const unlinked = replyBody(await command(stack, admin, roomA, "!ferry unlink"));
    assert.match(unlinked, /^Unlinked\. Messages no longer cross between this room and Commands B\./);
    await bob.waitForEvent(roomB, (e) => e.sender === stack.botUserId && /was unlinked from this room/.test(e.content.body ?? ""), T, "the unlink announcement");
    for (const [user, roomId] of [[admin, roomA], [bob, roomB]]) {
        const bridges = await stateOf(user, roomId, "m.bridge");
        assert.ok(bridges.every((e) => Object.keys(e.content).length === 0), `m.bridge emptied: ${JSON.stringify(bridges)}`);
        const functional = await stateOf(user, roomId, "io.element.functional_members");
        assert.ok(!(functional[0]?.content.service_members ?? []).includes(stack.botUserId), "the bot left the functional members");
    }
    const links = replyBody(await command(stack, bob, roomB, "!ferry links"));
    assert.match(links, /This room is not linked/);
    const help = replyBody(await command(stack, bob, roomB, "!ferry unlink"));
    assert.match(help, /`unlink` works only in a linked room/);
});

test("where the bot lacks power for its room state, it says so once and relays anyway", async () => {
    const roomC = await bob.createEncryptedRoom({ name: "Commands C" });
    await inviteBot(stack, bob, roomC, { power: 0 });
    const linkIt = async () => assert.match(replyBody(await command(stack, bob, roomC, `!ferry link ${roomB}`)), /^Linked/);
    await linkIt();
    const notice = await bob.waitForEvent(roomC, (e) => e.sender === stack.botUserId && /I cannot show this room's link/.test(e.content.body ?? ""), T, "the lack-of-power notice");
    assert.match(notice.content.body, /needs power level 50, and I have 0/);
    await bob.sendText(roomC, "relayed without power");
    await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.content.body === "relayed without power", T, "the message relayed from room C");
    // Unlink and link again: the notice is not repeated.
    assert.match(replyBody(await command(stack, bob, roomC, "!ferry unlink")), /^Unlinked/);
    await linkIt();
    await command(stack, bob, roomC, "!ferry ping");
    const notices = (await bob.events(roomC)).filter((e) => /I cannot show this room's link/.test(e.content?.body ?? ""));
    assert.equal(notices.length, 1, "the lack-of-power notice is sent once");
});
