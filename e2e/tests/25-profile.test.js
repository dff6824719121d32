// Issue 3, ghosts: a ghost shows its real user's display name through the configured per-room template
// (default "<display name> (<source room name>)") and the original avatar, and follows the real user's changes and
// its source room's renames.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { createUser } from "../lib/users.js";
import { linkedPair, startStack } from "../lib/stack.js";

let stack, alice, bob, roomA, roomB, aliceGhost;
const T = 30000;

/** Waits in bob's room B for the ghost's membership event satisfying `pred` on its content. */
function ghostMember(pred, what) {
    return bob.waitForEvent(roomB, (e) => e.type === "m.room.member" && e.stateKey === aliceGhost && pred(e.content), T, what);
}

before(async () => {
    stack = await startStack({ extraConfig: { appservice: { bot: { avatar: "mxc://ferry.test/ferryBotAvatar" } } } });
    ({ alice, bob, roomA, roomB } = await linkedPair(stack, { names: ["Garden", "Kitchen"], users: [{ displayName: "Alice" }, { displayName: "Bob" }] }));
});

after(async () => {
    await Promise.all([alice?.stop(), bob?.stop()]);
    await stack?.stop();
});

test("a ghost is named after its user and the source room, with the user's avatar", async () => {
    await alice.client.setAvatarUrl("mxc://ferry.test/aliceAvatar1");
    await alice.sendText(roomA, "who am I over there?");
    const copy = await bob.waitForEvent(roomB, (e) => e.type === "m.room.message" && e.content.body === "who am I over there?", T, "the copy");
    aliceGhost = copy.sender;
    assert.notEqual(aliceGhost, alice.userId);
    // Synapse updates alice's membership in room A with her new avatar a moment after the profile change, so the
    // message may cross first: the ghost then takes the avatar when that update reaches ferry.
    const member = await ghostMember((c) => c.membership === "join" && c.displayname === "Alice (Garden)" && c.avatar_url === "mxc://ferry.test/aliceAvatar1", "the ghost's templated name and alice's avatar");
    assert.equal(member.content.avatar_url, "mxc://ferry.test/aliceAvatar1");
    assert.equal(bob.client.getRoom(roomB).getMember(aliceGhost).name, "Alice (Garden)", "bob's client shows the ghost under the templated name");
    // Every membership event of the ghost carries a name (the bot's invite shows its global name), and the join
    // itself the per-room one: bob never sees the ghost's raw ID join and then change its name.
    const members = (await bob.events(roomB)).filter((e) => e.type === "m.room.member" && e.stateKey === aliceGhost);
    for (const m of members) assert.ok(m.content.displayname, `the ghost's ${m.content.membership} has no name`);
    const join = members.find((m) => m.content.membership === "join");
    assert.equal(join.content.displayname, "Alice (Garden)", "the ghost's join already has its per-room name");
    // Its global profile (what a client shows outside a room) is alice's own name, set before it joined.
    const profile = await (await fetch(`${stack.hs.url}/_matrix/client/v3/profile/${encodeURIComponent(aliceGhost)}`, { headers: { authorization: `Bearer ${bob.accessToken}` } })).json();
    assert.equal(profile.displayname, "Alice");
});

test("a long or multi-line name stays readable, and keeps the room it stands for", async () => {
    const carol = await createUser(stack.hs.url, "carol", { displayName: `Carol ${"really ".repeat(30)}long\nsecond line` });
    try {
        await alice.invite(roomA, carol.userId);
        await carol.join(roomA);
        await carol.waitForMembership(roomA, stack.botUserId, "join");
        await carol.sendText(roomA, "my name is long");
        const copy = await bob.waitForEvent(roomB, (e) => e.type === "m.room.message" && e.content.body === "my name is long", T, "carol's copy");
        const name = bob.client.getRoom(roomB).getMember(copy.sender).name;
        assert.ok([...name].length <= 96, `${[...name].length} characters: ${name}`);
        assert.ok(!/[\n\r]/.test(name), "one line");
        assert.match(name, /^Carol really .*… \(Garden\)$/, "shortened where the name is long, the room name kept");
    } finally {
        await carol.stop();
    }
});

test("renaming and changing the avatar in the source room updates the ghost", async () => {
    await alice.client.setDisplayName("Alicia");
    await ghostMember((c) => c.displayname === "Alicia (Garden)", "the ghost's new name");
    await alice.client.setAvatarUrl("mxc://ferry.test/aliceAvatar2");
    await ghostMember((c) => c.avatar_url === "mxc://ferry.test/aliceAvatar2", "the ghost's new avatar");
    await bob.waitForEvent(roomB, () => bob.client.getRoom(roomB).getMember(aliceGhost)?.name === "Alicia (Garden)", T, "the new name in bob's member list");
    // The next message still comes from the same ghost, now under the new name.
    await alice.sendText(roomA, "new name, same me");
    const copy = await bob.waitForEvent(roomB, (e) => e.type === "m.room.message" && e.content.body === "new name, same me", T, "the copy after renaming");
    assert.equal(copy.sender, aliceGhost);
});

test("the bot wears the avatar its config gives it", async () => {
    const profile = await (await fetch(`${stack.hs.url}/_matrix/client/v3/profile/${encodeURIComponent(stack.botUserId)}`, { headers: { authorization: `Bearer ${bob.accessToken}` } })).json();
    assert.equal(profile.avatar_url, "mxc://ferry.test/ferryBotAvatar");
    assert.equal(profile.displayname, "ferry");
});

test("renaming the source room renames its members' ghosts", async () => {
    await alice.client.setRoomName(roomA, "Orchard");
    await ghostMember((c) => c.displayname === "Alicia (Orchard)", "the ghost's name with the room's new name");
    await bob.waitForEvent(roomB, () => bob.client.getRoom(roomB).getMember(aliceGhost)?.name === "Alicia (Orchard)", T, "the renamed ghost in bob's member list");
});
