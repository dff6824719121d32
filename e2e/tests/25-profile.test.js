// Issue 3, ghosts: a ghost shows its real user's display name through the configured per-room template
// (default "<display name> (<source room name>)") and the original avatar, and follows the real user's changes.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { createUser } from "../lib/users.js";
import { inviteBot, linkByRequest, startStack } from "../lib/stack.js";

let stack, alice, bob, roomA, roomB, aliceGhost;
const T = 30000;

/** Waits in bob's room B for the ghost's membership event satisfying `pred` on its content. */
function ghostMember(pred, what) {
    return bob.waitForEvent(roomB, (e) => e.type === "m.room.member" && e.stateKey === aliceGhost && pred(e.content), T, what);
}

before(async () => {
    stack = await startStack();
    [alice, bob] = await Promise.all([
        createUser(stack.hs.url, "alice", { displayName: "Alice" }),
        createUser(stack.hs.url, "bob", { displayName: "Bob" }),
    ]);
    roomA = await alice.createEncryptedRoom({ name: "Garden" });
    roomB = await bob.createEncryptedRoom({ name: "Kitchen" });
    await inviteBot(stack, alice, roomA);
    await inviteBot(stack, bob, roomB);
    await linkByRequest(stack, alice, roomA, bob, roomB);
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
