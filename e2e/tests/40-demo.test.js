// `make demo` is one of the README's two commands: prove it relays and decrypts, on SQLite, from a built binary.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import path from "node:path";
import { test } from "node:test";
import { repoRoot } from "../lib/util.js";

test("the demo links two encrypted rooms on SQLite and shows a relayed message decrypted", () => {
    const r = spawnSync(process.execPath, [path.join(repoRoot, "e2e", "demo.js")], {
        env: { ...process.env, FERRY_DEMO_ONCE: "1" },
        encoding: "utf8",
        timeout: 180000,
    });
    assert.equal(r.status, 0, `demo exited ${r.status}: ${r.stderr}`);
    assert.match(r.stdout, /Bob's client decrypted, in Bob's room, from "Alice \(Alice's room\)": Hello Bob/);
    assert.match(r.stdout, /homeserver: http:\/\/127\.0\.0\.1:\d+/);
});
