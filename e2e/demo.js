// `make demo`: a homeserver (Synapse or Dendrite, as FERRY_E2E_HS says) + ferry on 127.0.0.1 with the embedded
// SQLite database, two users in two encrypted rooms linked by the bot, one message relayed and shown decrypted on
// the other side. Then the stack keeps running with login details for Element (or any Matrix client) until
// Ctrl-C. FERRY_DEMO_ONCE=1 exits after the relay (used by the test suite to prove the demo works).
import { HS_LABEL } from "./lib/homeserver.js";
import { createUser } from "./lib/users.js";
import { command, inviteBot, startStack } from "./lib/stack.js";
import { sleep } from "./lib/util.js";

const once = process.env.FERRY_DEMO_ONCE === "1";
const say = (...a) => console.log(...a);

say(`Starting ${HS_LABEL} and ferry on 127.0.0.1 (SQLite)...`);
const stack = await startStack({ db: "sqlite", permissions: { "*": "relay", "ferry.test": "user" } });
let alice, bob;
const shutdown = async (code) => {
    await Promise.all([alice?.stop(), bob?.stop()]);
    await stack.stop();
    process.exit(code);
};
process.on("SIGINT", () => shutdown(0));
process.on("SIGTERM", () => shutdown(0));

try {
    const password = "ferry-demo-password";
    [alice, bob] = await Promise.all([
        createUser(stack.hs.url, "alice", { password, displayName: "Alice" }),
        createUser(stack.hs.url, "bob", { password, displayName: "Bob" }),
    ]);
    const roomA = await alice.createEncryptedRoom({ name: "Alice's room" });
    const roomB = await bob.createEncryptedRoom({ name: "Bob's room" });
    await inviteBot(stack, alice, roomA);
    await inviteBot(stack, bob, roomB);
    // bob may change settings in both rooms, so one command links them.
    await alice.invite(roomA, bob.userId);
    await bob.join(roomA);
    await alice.client.setPowerLevel(roomA, bob.userId, 50);
    const reply = await command(stack, bob, roomB, `!ferry link ${roomA}`);
    say(`ferry (in Bob's room, decrypted): ${reply.content.body}`);
    await bob.leave(roomA);

    await alice.sendText(roomA, "Hello Bob, this crossed an encrypted link!");
    const copy = await bob.waitForEvent(roomB, (e) => e.sender.startsWith("@_ferry_") && e.type === "m.room.message", 30000, "the relayed message");
    const name = bob.client.getRoom(roomB).getMember(copy.sender)?.name;
    say(`Bob's client decrypted, in Bob's room, from "${name}": ${copy.content.body}`);

    say("");
    say("The stack is running. Log in with Element (or any Matrix client):");
    say(`  homeserver: ${stack.hs.url}`);
    say(`  users:      ${alice.userId} and ${bob.userId}, password ${password}`);
    say(`  rooms:      "Alice's room" ${roomA} <-> "Bob's room" ${roomB}`);
    say(`  ferry log:  ${stack.prepared.dir}/ferry.log`);
    say("Press Ctrl-C to stop.");
    if (once) await shutdown(0);
    for (;;) await sleep(60000);
} catch (e) {
    console.error(`demo failed: ${e.stack ?? e}`);
    await shutdown(1);
}
