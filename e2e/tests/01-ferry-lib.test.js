// Unit tests of e2e/lib/ferry.js (config writing, Postgres helper) plus a start/stop smoke test of the ferry
// binary, skipped when it is not built.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import {
    createTestDatabase,
    deepMerge,
    ferryBin,
    ferryConfig,
    prepareFerry,
    startFerry,
    toYaml,
    yamlTopLevel,
} from "../lib/ferry.js";
import { ferryConfigFor, HS_LABEL, startHomeserver } from "../lib/homeserver.js";
import { repoRoot } from "../lib/util.js";

test("toYaml writes block YAML that keeps keys, quoting and nesting", () => {
    const text = toYaml({
        a: { b: 1, "c.d": "x: #y", e: [], f: {} },
        "*": "relay",
        list: ["p", { q: true, r: null }],
    });
    assert.equal(
        text,
        [
            "a:",
            "  b: 1",
            '  "c.d": "x: #y"',
            "  e: []",
            "  f: {}",
            '"*": "relay"',
            "list:",
            '  - "p"',
            "  - q: true",
            "    r: null",
        ].join("\n"),
    );
    // JSON-compatible YAML: the same text must parse as the same data under a JSON-ish reading of scalars.
    assert.equal(yamlTopLevel('id: ferry\nas_token: "a b"\nhs_token: \'c\'\'d\'\n', "as_token"), "a b");
    assert.equal(yamlTopLevel("id: ferry\nhs_token: 'c''d'\n", "hs_token"), "c'd");
    assert.equal(yamlTopLevel("id: ferry\n", "as_token"), undefined);
});

test("deepMerge merges objects, replaces the rest and deletes undefined", () => {
    assert.deepEqual(deepMerge({ a: { b: 1, c: 2 }, d: [1], e: 1 }, { a: { c: 3 }, d: [2], e: undefined }), {
        a: { b: 1, c: 3 },
        d: [2],
    });
});

test("ferryConfig has the contract's keys, SQLite by default, admins and extraConfig applied", () => {
    const cfg = ferryConfig({
        dir: "/tmp/x",
        port: 1234,
        hsUrl: "http://127.0.0.1:5678",
        hsDomain: "ferry.test",
        sharedSecret: "s",
        permissions: { "other.test": "relay" },
        admins: ["@boss:ferry.test"],
        extraConfig: { bridge: { extra_key: 1 }, logging: { min_level: "trace" } },
    });
    assert.deepEqual(cfg.homeserver, { address: "http://127.0.0.1:5678", domain: "ferry.test", registration_shared_secret: "s" });
    assert.equal(cfg.appservice.address, "http://127.0.0.1:1234");
    assert.equal(cfg.appservice.port, 1234);
    assert.deepEqual(cfg.appservice.bot, { username: "ferrybot", displayname: "ferry" });
    assert.deepEqual(cfg.database, { type: "sqlite3-fk-wal", uri: "file:/tmp/x/ferry.db?_txlock=immediate" });
    assert.deepEqual(cfg.bridge, { command_prefix: "!ferry", ghost_prefix: "_ferry_", extra_key: 1 });
    assert.equal(cfg.encryption.pickle_key, "generate");
    assert.deepEqual(cfg.permissions, {
        "*": "relay",
        "ferry.test": "user",
        "other.test": "relay",
        "@boss:ferry.test": "admin",
    });
    assert.deepEqual(cfg.logging, { min_level: "trace", format: "json", file: "/tmp/x/ferry.log" });
});

test("a missing ferry binary fails with one line naming the fix", async () => {
    const saved = process.env.FERRY_BIN;
    process.env.FERRY_BIN = "/nonexistent/ferry";
    try {
        await assert.rejects(prepareFerry(), (e) => {
            assert.match(e.message, /^e2e: ferry binary not found at \/nonexistent\/ferry: build it with/);
            assert.ok(!e.message.includes("\n"));
            return true;
        });
    } finally {
        if (saved === undefined) delete process.env.FERRY_BIN;
        else process.env.FERRY_BIN = saved;
    }
});

test("createTestDatabase needs FERRY_TEST_PG, then creates and drops a database", (t) => {
    const saved = process.env.FERRY_TEST_PG;
    delete process.env.FERRY_TEST_PG;
    try {
        assert.throws(() => createTestDatabase(), /FERRY_TEST_PG is unset/);
    } finally {
        if (saved !== undefined) process.env.FERRY_TEST_PG = saved;
    }
    if (!saved) {
        t.skip("FERRY_TEST_PG is unset");
        return;
    }
    const db = createTestDatabase();
    const exists = () =>
        spawnSync("psql", [saved, "-qAtXc", `SELECT count(*) FROM pg_database WHERE datname = '${db.name}'`], {
            encoding: "utf8",
        }).stdout.trim();
    assert.equal(exists(), "1");
    assert.equal(new URL(db.uri).pathname, `/${db.name}`);
    const r = spawnSync("psql", [db.uri, "-qAtXc", "SELECT current_database()"], { encoding: "utf8" });
    assert.equal(r.stdout.trim(), db.name);
    db.drop();
    assert.equal(exists(), "0");
});

test(`ferry starts against ${HS_LABEL}, answers ready, restarts and stops`, async (t) => {
    if (!fs.existsSync(ferryBin())) {
        t.skip(`no ferry binary at ${ferryBin()}`);
        return;
    }
    const prepared = await prepareFerry({ admins: ["@admin:ferry.test"], extraConfig: ferryConfigFor() });
    let hs;
    let ferry;
    try {
        const config = fs.readFileSync(prepared.configPath, "utf8");
        assert.match(config, new RegExp(`as_token: "?${prepared.asToken}"?`), "ferry -g wrote the token back");
        assert.equal(prepared.botUserId, "@ferrybot:ferry.test");
        hs = await startHomeserver({
            appserviceRegistrations: [prepared.registrationPath],
            sharedSecret: prepared.sharedSecret,
            port: prepared.hsPort,
        });
        assert.equal(hs.url, prepared.hsUrl);
        ferry = await startFerry(prepared);
        assert.equal((await fetch(`${ferry.url}/_matrix/mau/ready`)).status, 200);
        await ferry.restart();
        assert.ok(ferry.logLines().length > 0, "ferry wrote its JSON log");
        const exit = await ferry.stop();
        assert.equal(exit.code, 0, `ferry exited ${JSON.stringify(exit)}`);
    } finally {
        await ferry?.kill9();
        await hs?.stop();
        prepared.cleanup();
    }
});

test("a test file whose test failed keeps its temp dirs; one whose tests passed removes them", () => {
    const work = fs.mkdtempSync(path.join(os.tmpdir(), "ferry-keeptest-"));
    try {
        const util = path.join(repoRoot, "e2e", "lib", "util.js");
        const dirOf = (pass) => {
            const file = path.join(work, `${pass ? "passes" : "fails"}.test.mjs`);
            fs.writeFileSync(
                file,
                `import { test } from "node:test";\nimport { makeTempDir, removeTempDir } from ${JSON.stringify(util)};\n` +
                    `test("makes a dir", () => {\n  const dir = makeTempDir("ferry-keeptest-${pass ? "p" : "f"}-");\n  console.log("DIR=" + dir);\n` +
                    `  ${pass ? "" : 'throw new Error("fails on purpose");'}\n});\n` +
                    `test("removes it afterwards", () => {});\n`,
            );
            const env = { ...process.env };
            delete env.NODE_TEST_CONTEXT;
            delete env.FERRY_E2E_KEEP;
            const r = spawnSync(process.execPath, ["--test", file], { encoding: "utf8", env });
            assert.equal(r.status, pass ? 0 : 1, r.stdout + r.stderr);
            const dir = r.stdout.match(/DIR=(\S+)/)?.[1];
            assert.ok(dir, r.stdout);
            return dir;
        };
        const kept = dirOf(false);
        assert.ok(fs.existsSync(kept), "the failed file's dir was removed");
        fs.rmSync(kept, { recursive: true, force: true });
        assert.ok(!fs.existsSync(dirOf(true)), "the passing file's dir was kept");
    } finally {
        fs.rmSync(work, { recursive: true, force: true });
    }
});
