// Issue 12's end-to-end proof of least privilege. On Dendrite (no appservice-mode encryption), ferry keeps a
// homeserver admin helper account only to give its own accounts passwords: it is logged in only for the call that
// needs it (no device, no live token afterwards), `!ferry admin-helper` shows it, and `!ferry admin-helper remove`
// deactivates it for good while relaying goes on. On Synapse, appservice-mode encryption needs no passwords: the
// helper never exists, and the command says so.
import assert from "node:assert/strict";
import { after, test } from "node:test";
import { createUser, passwordLogin, registerWithSharedSecret } from "../lib/users.js";
import { onSynapse, skipUnless } from "../lib/homeserver.js";
import { command, inviteBot, linkByRequest, startStack } from "../lib/stack.js";

const T = 30000;
const HELPER = "@ferrybot-admin:ferry.test";
const isGhost = (userId) => userId.startsWith("@_ferry_");
const stacks = [];

after(async () => {
    for (const s of stacks) await s.stop();
});

/** A stack with alice (a ferry admin) in room A linked to bob's room B, and one message relayed each way. */
async function linkedStack() {
    const suffix = Math.random().toString(16).slice(2, 10);
    const adminName = `alice-${suffix}`;
    const stack = await startStack({ admins: [`@${adminName}:ferry.test`] });
    const [alice, bob] = await Promise.all([
        createUser(stack.hs.url, adminName, { randomSuffix: false }),
        createUser(stack.hs.url, "bob"),
    ]);
    stacks.push({ stop: async () => { await Promise.all([alice.stop(), bob.stop()]); await stack.stop(); } });
    const roomA = await alice.createEncryptedRoom({ name: "Privilege A" });
    const roomB = await bob.createEncryptedRoom({ name: "Privilege B" });
    await inviteBot(stack, alice, roomA);
    await inviteBot(stack, bob, roomB);
    await linkByRequest(stack, alice, roomA, bob, roomB);
    // Each side's ghost gets its own device in the other room (on Dendrite that needs a password set through the
    // admin helper).
    await alice.sendText(roomA, "hello B");
    await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.content.body === "hello B", T, "alice's message");
    await bob.sendText(roomB, "hello A");
    await alice.waitForEvent(roomA, (e) => isGhost(e.sender) && e.content.body === "hello A", T, "bob's message");
    return { stack, alice, bob, roomA, roomB };
}

/** An admin of the homeserver made for the test through the shared secret: { accessToken }. */
async function homeserverAdmin(stack) {
    const name = `e2eadmin-${Math.random().toString(16).slice(2, 10)}`;
    return registerWithSharedSecret(stack.hs.url, stack.prepared.sharedSecret, name, "e2e-admin-password", true);
}

async function http(method, url, token, body) {
    const res = await fetch(url, { method, headers: { "content-type": "application/json", authorization: `Bearer ${token}` }, body: body && JSON.stringify(body) });
    return { status: res.status, body: await res.json().catch(() => ({})) };
}

test("the admin helper holds no device or token between uses", async (t) => {
    if (skipUnless(t, "dendrite", "appservice-mode encryption needs no admin helper (the next test shows none exists)")) return;
    const { stack } = await linkedStack();
    // Take the helper over from outside: set a password we know (keeping its devices), log in, list its devices.
    const admin = await homeserverAdmin(stack);
    const reset = await http("POST", `${stack.hs.url}/_dendrite/admin/resetPassword/${encodeURIComponent(HELPER)}`, admin.accessToken, { password: "taken-over-1", logout_devices: false });
    assert.equal(reset.status, 200, `ferry created its admin helper: ${JSON.stringify(reset.body)}`);
    const login = await passwordLogin(stack.hs.url, HELPER, "taken-over-1", "e2e check");
    const devices = await http("GET", `${stack.hs.url}/_matrix/client/v3/devices`, login.accessToken);
    assert.deepEqual(devices.body.devices.map((d) => d.device_id), [login.deviceId], "only our own login: ferry logged its helper out after use");
});

test("admin-helper shows the helper and removes it for good; relaying goes on", async () => {
    const { stack, alice, bob, roomA, roomB } = await linkedStack();
    const dm = await alice.createEncryptedRoom({ name: "ferry admin" });
    await inviteBot(stack, alice, dm);
    const shown = (await command(stack, alice, dm, "admin-helper")).content.body;
    if (onSynapse) {
        assert.match(shown, /does not need one here/);
        const admin = await homeserverAdmin(stack);
        const user = await http("GET", `${stack.hs.url}/_synapse/admin/v2/users/${encodeURIComponent(HELPER)}`, admin.accessToken);
        assert.equal(user.status, 404, `no admin helper account exists on Synapse: ${JSON.stringify(user.body)}`);
        return;
    }
    assert.match(shown, new RegExp(`admin helper \`${HELPER}\` exists`));
    assert.match(shown, /It is logged out/);
    const refused = (await command(stack, bob, roomB, "!ferry admin-helper remove")).content.body;
    assert.match(refused, /needs permission level `admin`/, "only ferry admins may remove it");
    const removed = (await command(stack, alice, dm, "admin-helper remove")).content.body;
    assert.match(removed, /^Deactivated ferry's admin helper account/);
    assert.match((await command(stack, alice, dm, "admin-helper")).content.body, /was removed; ferry will not create it again/);
    // The account is gone for good: even with a password set from outside it cannot log in.
    const admin = await homeserverAdmin(stack);
    await http("POST", `${stack.hs.url}/_dendrite/admin/resetPassword/${encodeURIComponent(HELPER)}`, admin.accessToken, { password: "taken-over-2", logout_devices: false });
    await assert.rejects(passwordLogin(stack.hs.url, HELPER, "taken-over-2", "e2e check"), /403/, "the deactivated helper cannot log in");
    // A new user's ghost would have needed a password: ferry relays without recreating the helper.
    const carol = await createUser(stack.hs.url, "carol");
    try {
        await alice.invite(roomA, carol.userId);
        await carol.join(roomA);
        await alice.waitForMembership(roomA, carol.userId, "join");
        await carol.sendText(roomA, "carol after the removal");
        await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.content.body === "carol after the removal", T, "carol's message");
    } finally {
        await carol.stop();
    }
    assert.doesNotMatch(stack.ferry.logs().split("\n").filter((l) => /Created ferry's homeserver admin helper/.test(l)).slice(1).join("\n"), /./, "the helper was created once");
});
