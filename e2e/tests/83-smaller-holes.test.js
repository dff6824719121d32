// Issue 12's smaller holes, end to end: at debug level (what the harness always runs) a message relayed between
// unencrypted rooms reaches no log line (the HTTP client logs request bodies); ferry's SQLite database and its
// write-ahead log are readable by ferry's user only; a pickle key of "generate" from the environment, or one
// shorter than 32 characters, stops ferry at once with the variable named.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";
import { createUser } from "../lib/users.js";
import { ferryBin } from "../lib/ferry.js";
import { command, inviteBot, startStack } from "../lib/stack.js";

const T = 30000;
let stack, alice, bob;
const isGhost = (userId) => userId.startsWith("@_ferry_");

before(async () => {
    // SQLite (the default of small installs), and unencrypted rooms allowed to link.
    stack = await startStack({ db: "sqlite", extraConfig: { bridge: { allow_unencrypted_targets: true } } });
    [alice, bob] = await Promise.all([createUser(stack.hs.url, "alice"), createUser(stack.hs.url, "bob")]);
});

after(async () => {
    await Promise.all([alice?.stop(), bob?.stop()]);
    await stack?.stop();
});

test("at debug level, a message relayed in the clear reaches no log line", async () => {
    const roomA = await alice.createRoom({ name: "Plain A" });
    const roomB = await bob.createRoom({ name: "Plain B" });
    await inviteBot(stack, alice, roomA, { power: 100 });
    await inviteBot(stack, bob, roomB, { power: 100 });
    await alice.invite(roomA, bob.userId);
    await bob.join(roomA);
    await alice.client.setPowerLevel(roomA, bob.userId, 50);
    assert.match((await command(stack, bob, roomB, `!ferry link ${roomA}`)).content.body, /^Linked/);
    const body = `plain words ${Date.now()}`;
    await alice.sendText(roomA, body);
    const copy = await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.content.body === body, T, "the copy");
    assert.equal(copy.encrypted, false, "the copy went out in the clear, as the rooms are");
    const logs = stack.ferry.logs();
    assert.ok(logs.includes('"level":"debug"'), "ferry logs at debug level");
    assert.ok(!logs.includes(body), "the message body is in no log line");
    assert.ok(!logs.includes('"req_body"'), "no request body is logged");
});

test("the SQLite database and its write-ahead log are readable by ferry's user only", () => {
    const db = path.join(stack.prepared.dir, "ferry.db");
    for (const f of [db, `${db}-wal`]) {
        const mode = fs.statSync(f).mode & 0o777;
        assert.equal(mode.toString(8), "600", `${path.basename(f)} has mode ${mode.toString(8)}`);
    }
});

for (const [what, value, want] of [
    ["generate", "generate", /FERRY_ENCRYPTION_PICKLE_KEY: encryption\.pickle_key: "generate" cannot come from the environment/],
    ["a short key", "hunter2", /FERRY_ENCRYPTION_PICKLE_KEY: encryption\.pickle_key: must be at least 32 characters \(got 7\)/],
]) {
    test(`FERRY_ENCRYPTION_PICKLE_KEY set to ${what} stops ferry at once, naming the variable`, () => {
        const r = spawnSync(ferryBin(), ["-c", stack.prepared.configPath], {
            env: { ...process.env, FERRY_ENCRYPTION_PICKLE_KEY: value },
            encoding: "utf8",
            timeout: 15000,
        });
        assert.notEqual(r.status, null, "ferry exited instead of running");
        assert.notEqual(r.status, 0);
        assert.match(r.stderr, want);
    });
}
