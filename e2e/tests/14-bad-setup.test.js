// Set-ups an admin gets wrong, on a real homeserver: each gives one clear log line naming the fix; ferry waits
// where the cause can pass (the homeserver still starting) and stops only on a definite rejection.
import assert from "node:assert/strict";
import fs from "node:fs";
import { after, test } from "node:test";
import { createTestDatabase, prepareFerry, startFerry } from "../lib/ferry.js";
import { ferryConfigFor, HS_LABEL, onSynapse, startHomeserver } from "../lib/homeserver.js";
import { command, inviteBot, SHARED_SECRET } from "../lib/stack.js";
import { createUser } from "../lib/users.js";
import { pollUntil, withTimeout } from "../lib/util.js";

const cleanups = [];
after(async () => {
    for (const c of cleanups.reverse()) await c().catch(() => {});
});

/** ferry's prepared config on Postgres for this homeserver; `edit` may change the registration file's text. */
async function prepare(edit) {
    const database = createTestDatabase();
    const prepared = await prepareFerry({ sharedSecret: SHARED_SECRET, db: { type: "postgres", uri: database.uri }, extraConfig: ferryConfigFor() });
    cleanups.push(async () => {
        database.drop();
        prepared.cleanup();
    });
    if (edit) fs.writeFileSync(prepared.registrationPath, edit(fs.readFileSync(prepared.registrationPath, "utf8")));
    return prepared;
}

async function homeserver(prepared, registrations = [prepared.registrationPath]) {
    const hs = await startHomeserver({ appserviceRegistrations: registrations, sharedSecret: SHARED_SECRET, port: prepared.hsPort });
    cleanups.push(() => hs.stop());
    return hs;
}

/** Starts ferry without waiting for it to be ready and waits for it to exit (at most 90 s). */
async function exitOf(prepared) {
    const ferry = await startFerry(prepared, { waitReady: false });
    cleanups.push(() => ferry.stop());
    const exit = await withTimeout(ferry.exited, 90000, "ferry to exit");
    return { exit, errors: ferry.logLines().filter((l) => l.level === "error"), ferry };
}

test(`${HS_LABEL}: ferry started before the homeserver waits for it, then works`, async () => {
    const prepared = await prepare();
    const ferry = await startFerry(prepared, { waitReady: false });
    cleanups.push(() => ferry.stop());
    await ferry.waitForLog((l) => l.message === "Homeserver unreachable, retrying", 20000, "ferry to say the homeserver is unreachable");
    const hs = await homeserver(prepared);
    await ferry.waitForLog((l) => l.message === "ferry is ready", 120000, "ferry to become ready once the homeserver answers");
    const alice = await createUser(hs.url, "alice");
    cleanups.push(() => alice.stop());
    const room = await alice.createEncryptedRoom({ name: "late start" });
    await inviteBot({ botUserId: prepared.botUserId }, alice, room);
    const reply = await command({ botUserId: prepared.botUserId }, alice, room, "!ferry ping");
    assert.equal(reply.isDecryptionFailure, false);
});

test(`${HS_LABEL}: a homeserver without ferry's registration stops ferry with one line naming the fix`, async () => {
    const prepared = await prepare();
    await homeserver(prepared, []);
    const { exit, errors } = await exitOf(prepared);
    assert.equal(exit?.code, 4, `ferry exited ${JSON.stringify(exit)}`);
    assert.equal(errors.length, 1, JSON.stringify(errors));
    assert.match(errors[0].error, /as_token/);
    assert.match(errors[0].error, /registration/);
});

test(`${HS_LABEL}: a registration with another as_token stops ferry with one line naming the fix`, async () => {
    const prepared = await prepare((text) => text.replace(/^as_token: .*$/m, 'as_token: "not-ferrys-as-token-0123456789"'));
    await homeserver(prepared);
    const { exit, errors } = await exitOf(prepared);
    assert.equal(exit?.code, 4, `ferry exited ${JSON.stringify(exit)}`);
    assert.equal(errors.length, 1, JSON.stringify(errors));
    assert.match(errors[0].error, /as_token/);
});

test(`${HS_LABEL}: a registration with another hs_token is named in ferry's log`, async () => {
    const prepared = await prepare((text) => text.replace(/^hs_token: .*$/m, 'hs_token: "not-ferrys-hs-token-0123456789"'));
    const hs = await homeserver(prepared);
    if (onSynapse) {
        // Synapse pings ferry at start with its hs_token: ferry refuses it, and stops with the reason.
        const { exit, errors } = await exitOf(prepared);
        assert.equal(exit?.code, 4, `ferry exited ${JSON.stringify(exit)}`);
        const stop = errors.find((l) => l.message === "Homeserver check failed");
        assert.match(stop?.error ?? "", /presents another hs_token than appservice\.hs_token/, JSON.stringify(errors));
        return;
    }
    // Dendrite has no ping: ferry starts, and says so as soon as the homeserver pushes something.
    const ferry = await startFerry(prepared);
    cleanups.push(() => ferry.stop());
    const alice = await createUser(hs.url, "alice");
    cleanups.push(() => alice.stop());
    const room = await alice.createEncryptedRoom({ name: "wrong hs_token" });
    await alice.invite(room, prepared.botUserId);
    const line = await ferry.waitForLog((l) => /wrong hs_token/.test(l.message ?? ""), 60000, "the wrong hs_token line");
    assert.match(line.message, /appservice\.hs_token/);
    await pollUntil(() => ferry.logLines().filter((l) => /wrong hs_token/.test(l.message ?? "")).length === 1, { timeoutMs: 1000, what: "one line" });
});
