// Issue 14, what an operator does to a running ferry: SIGHUP reopens the log file (external log rotation) and
// reloads the permissions without stopping ferry.
import assert from "node:assert/strict";
import fs from "node:fs";
import { after, before, test } from "node:test";
import { HS_LABEL } from "../lib/homeserver.js";
import { command, inviteBot, startStack } from "../lib/stack.js";
import { createUser } from "../lib/users.js";

const T = 30000;
const suffix = Math.random().toString(16).slice(2, 10);
const adminName = `admin-${suffix}`;
const relayName = `relayonly-${suffix}`;

let stack, admin, mallory, room;

before(async () => {
    stack = await startStack({
        permissions: { "*": "relay", "ferry.test": "user", [`@${relayName}:ferry.test`]: "relay" },
        admins: [`@${adminName}:ferry.test`],
    });
    [admin, mallory] = await Promise.all([
        createUser(stack.hs.url, adminName, { randomSuffix: false, displayName: "Admin" }),
        createUser(stack.hs.url, relayName, { randomSuffix: false, displayName: "Mallory" }),
    ]);
    room = await admin.createEncryptedRoom({ name: "Operating" });
    await inviteBot(stack, admin, room);
    await admin.invite(room, mallory.userId);
    await mallory.join(room);
    await admin.waitForMembership(room, mallory.userId, "join");
});

after(async () => {
    await Promise.all([admin?.stop(), mallory?.stop()]);
    await stack?.stop();
});

test(`${HS_LABEL}: SIGHUP reopens the log file and reloads the permissions; ferry keeps running`, async () => {
    const refused = await command(stack, mallory, room, "!ferry ping", T);
    assert.match(refused.content.body, /yours is `relay`/);

    // The permission changes in the file (which ferry has upgraded to the current layout at start).
    const cfg = fs.readFileSync(stack.prepared.configPath, "utf8");
    const entry = `"@${relayName}:ferry.test": "relay"`;
    assert.ok(cfg.includes(entry), "the config lists mallory as relay");
    fs.writeFileSync(stack.prepared.configPath, cfg.replace(entry, `"@${relayName}:ferry.test": "user"`));
    // An external tool rotates the log: it moves the file away, then signals ferry.
    const logFile = stack.ferry.logFile;
    fs.renameSync(logFile, `${logFile}.1`);
    process.kill(stack.ferry.pid, "SIGHUP");

    const reloaded = await stack.ferry.waitForLog((l) => l.message === "Permissions reloaded", T, "the permissions reloaded");
    assert.ok(reloaded.entries >= 3, `entries: ${reloaded.entries}`);
    assert.ok(stack.ferry.logLines().some((l) => l.message === "Reopened the log files"), "the reopening is logged in the new file");
    const old = fs.readFileSync(`${logFile}.1`, "utf8");
    assert.match(old, /"Starting ferry"/, "the moved file keeps what was logged before");
    assert.doesNotMatch(old, /Permissions reloaded/, "nothing is written to the moved file after SIGHUP");
    assert.doesNotMatch(stack.ferry.logs(), /"Starting ferry"/, "the new file starts at the SIGHUP");

    const pong = await command(stack, mallory, room, "!ferry ping", T);
    assert.match(pong.content.body, /^Pong/, "mallory's new level took effect");
    assert.ok(!stack.ferry.exitInfo, `ferry is still running (${JSON.stringify(stack.ferry.exitInfo)})`);
});
