// Issue 15, commands: help grouped by purpose with a legend of the arguments, in plain words; "did you mean" for
// typos of commands and their aliases; `link <A> <B>` from a management room under the usual consent rules; a
// status that fits a phone screen.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { createUser } from "../lib/users.js";
import { command, inviteBot, startStack } from "../lib/stack.js";

const T = 30000;
let stack, carol, dave, dm, roomC, roomD;
const body = (e) => e.content.body;

before(async () => {
    stack = await startStack();
    [carol, dave] = await Promise.all([createUser(stack.hs.url, "carol", { displayName: "Carol" }), createUser(stack.hs.url, "dave", { displayName: "Dave" })]);
    // carol's chat with the bot alone: a management room.
    dm = await carol.createEncryptedRoom({ name: "ferry and me" });
    roomC = await carol.createEncryptedRoom({ name: "Cedar" });
    roomD = await dave.createEncryptedRoom({ name: "Delta" });
    await inviteBot(stack, carol, dm);
    await inviteBot(stack, carol, roomC);
    await inviteBot(stack, dave, roomD);
    // dave is in Cedar too, without power: it is an ordinary room (commands need the prefix there).
    await carol.invite(roomC, dave.userId);
    await dave.join(roomC);
});

after(async () => {
    await Promise.all([carol?.stop(), dave?.stop()]);
    await stack?.stop();
});

test("help is grouped by purpose, explains its arguments, and speaks plainly", async () => {
    const help = await command(stack, carol, roomC, "!ferry help");
    const text = body(help);
    let at = -1;
    for (const group of ["Linking rooms", "This room's link", "About ferry"]) {
        const i = text.indexOf(`\n${group}\n`);
        assert.ok(i > at, `group "${group}" in order:\n${text}`);
        at = i;
    }
    assert.doesNotMatch(text, /For ferry's admins/, "a member sees no admins' commands");
    assert.match(text, /\nArguments\n- `<…>`: fill in; `\[…\]`: optional\n- `<room>`: a room ID/);
    assert.match(help.content.formatted_body, /<strong>Linking rooms<\/strong><ul><li><code>!ferry link &lt;room&gt; \[room\]<\/code>/);
    assert.doesNotMatch(text, /outbound|session|megolm|cross-sign/i, "no jargon for members");
});

test("a typo gets a suggestion, and aliases work", async () => {
    assert.match(body(await command(stack, carol, roomC, "!ferry lnik")), /^Unknown command `lnik`\. Did you mean `!ferry link`\?/);
    assert.match(body(await command(stack, carol, dm, "stauts")), /^Unknown command `stauts`\. Did you mean `status`\?/);
    assert.match(body(await command(stack, carol, roomC, "!ferry decilne")), /Did you mean `!ferry reject`\?/, "a typo of an alias names the command");
    assert.match(body(await command(stack, carol, roomC, "!ferry health")), /This room is not linked/, "health runs status");
});

test("link two rooms from a management room: a request where the sender has no power, then the link", async () => {
    const asked = await command(stack, carol, dm, `link ${roomC} ${roomD}`);
    assert.match(body(asked), /needs consent/);
    const request = await dave.waitForEvent(roomD, (e) => e.sender === stack.botUserId && /asks to link this room with Cedar/.test(body(e) ?? ""), T, "the link request");
    const id = body(request).match(/Request `([0-9a-f]+)`/)[1];
    const accepted = await command(stack, dave, roomD, `!ferry accept ${id}`);
    assert.match(body(accepted), /^Linked: Cedar, Delta\./);
    await carol.waitForEvent(roomC, (e) => e.sender === stack.botUserId && /now linked with/.test(body(e) ?? ""), T, "the announcement in C");
    await dave.waitForMembership(roomD, stack.botUserId, "join");
    await carol.sendText(roomC, "across, linked from my DM");
    await dave.waitForText(roomD, "across, linked from my DM", T);
});

test("link two rooms where the sender has power in both: linked at once", async () => {
    const e = await carol.createEncryptedRoom({ name: "East" });
    const f = await carol.createEncryptedRoom({ name: "West" });
    await inviteBot(stack, carol, e);
    await inviteBot(stack, carol, f);
    const linked = await command(stack, carol, dm, `!ferry link ${e} ${f}`);
    assert.match(body(linked), /^Linked: East, West\./);
    for (const room of [e, f]) await carol.waitForEvent(room, (ev) => ev.sender === stack.botUserId && /now linked with East, West by/.test(body(ev) ?? ""), T, "the announcement");
    const elsewhere = await command(stack, carol, roomC, `!ferry link ${e} ${f}`);
    assert.match(body(elsewhere), /works in a chat with me alone/);
});

test("status shows each room's health in lines that fit a phone screen", async () => {
    const status = await command(stack, carol, roomC, "!ferry status");
    const lines = body(status).split("\n");
    for (const line of lines) assert.ok([...line].length <= 40, `a line of ${[...line].length} characters: ${line}`);
    assert.match(body(status), /\n✅ Cedar \(here\)\nlast relayed \d+(s|m \d+s) ago\n/);
    assert.match(body(status), /\n✅ Delta\n(nothing relayed yet|last relayed)/);
    assert.match(status.content.formatted_body, /✅ <strong>Cedar<\/strong> \(here\)<br>last relayed/);
});
