// Postgres.js (npm `postgres`, porsager: a pure-JavaScript protocol implementation, no libpq)
// through leasegate, verifying the server certificate against the CA and the host name, with a
// client certificate passed in the `ssl` object (Node's tls.connect options).
//
// Driven by tests/integration/compat_postgres_js.rs. Connection from the environment: LG_HOST
// (name the server certificate must match), LG_HOSTADDR, LG_PORT, LG_DBNAME, LG_USER (the
// Vault role), LG_SSLROOTCERT, LG_SSLCERT, LG_SSLKEY.
//
// Prints one JSON line {"ok": ..., "checks": {...}, versions...}; exits 0 only when every check
// passed. Install: npm ci --prefix tests/clients/node

import fs from 'node:fs';
import { createRequire } from 'node:module';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';

const require = createRequire(import.meta.url);
let postgres;
try {
  postgres = (await import('postgres')).default;
} catch (e) {
  console.log(JSON.stringify({
    ok: false,
    error: `cannot load postgres (${e.message}); run \`npm ci --prefix tests/clients/node\``,
  }));
  process.exit(2);
}

function packageVersion(name) {
  const path = require.resolve(name);
  const root = path.slice(0, path.lastIndexOf(`node_modules/${name}/`) + `node_modules/${name}/`.length);
  return JSON.parse(fs.readFileSync(`${root}package.json`, 'utf8')).version;
}

const result = {
  client: 'postgres.js',
  postgres: packageVersion('postgres'),
  node: process.version,
  checks: {},
};

function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`environment variable ${name} is not set`);
  return v;
}

function tls(overrides = {}) {
  return {
    ca: fs.readFileSync(env('LG_SSLROOTCERT')),
    cert: fs.readFileSync(env('LG_SSLCERT')),
    key: fs.readFileSync(env('LG_SSLKEY')),
    // The host is an IP address: verify the certificate against this name.
    servername: env('LG_HOST'),
    rejectUnauthorized: true,
    ...overrides,
  };
}

function connect(options = {}) {
  const { ssl, ...rest } = options;
  return postgres({
    host: env('LG_HOSTADDR'),
    port: Number(env('LG_PORT')),
    username: env('LG_USER'),
    database: env('LG_DBNAME'),
    ssl: tls(ssl),
    connect_timeout: 15,
    idle_timeout: 5,
    max: 1,
    onnotice: () => {},
    ...rest,
  });
}

function expect(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

async function withSql(options, fn) {
  const sql = connect(options);
  try {
    return await fn(sql);
  } finally {
    await sql.end({ timeout: 5 });
  }
}

async function expectError(promise, what) {
  try {
    await promise;
  } catch (e) {
    return e;
  }
  throw new Error(`check failed: ${what} succeeded`);
}

async function check(name, fn) {
  const started = process.hrtime.bigint();
  console.error(`check ${name}`);
  try {
    const details = (await Promise.race([
      fn(),
      new Promise((_, reject) => setTimeout(() => reject(new Error('check timed out after 60 s')), 60000)),
    ])) || {};
    details.ok = true;
    details.ms = Number((process.hrtime.bigint() - started) / 1000000n);
    result.checks[name] = details;
  } catch (e) {
    result.checks[name] = { ok: false, error: String(e && e.stack || e) };
  }
}

async function verifyFullTls() {
  const details = await withSql({}, async (sql) => {
    const [row] = await sql`select current_user::text as u, pg_backend_pid() as pid`;
    expect(row.u !== env('LG_USER'), `session user ${row.u} is a dynamic role`);
    return { session_user: row.u, backend_pid: row.pid, password_asked: false };
  });
  // Negative controls: the system CAs only, and a name the certificate does not carry.
  const untrusted = await expectError(
    withSql({ ssl: { ca: undefined }, connection: {} }, (sql) => sql`select 1`),
    'an untrusted server certificate');
  expect(/certificate|issuer/i.test(`${untrusted.code} ${untrusted.message}`), `untrusted CA: ${untrusted.code} ${untrusted.message}`);
  const wrongName = await expectError(
    withSql({ ssl: { servername: 'wrong.example' } }, (sql) => sql`select 1`),
    'a wrong host name');
  expect(wrongName.code === 'ERR_TLS_CERT_ALTNAME_INVALID', `wrong name: ${wrongName.code} ${wrongName.message}`);
  details.untrusted_ca_refused = untrusted.code;
  details.wrong_name_refused = wrongName.code;
  return details;
}

async function queries() {
  return withSql({ connection: { application_name: 'postgres-js-compat' } }, async (sql) => {
    // Simple query protocol: several statements in one Query message.
    const multi = await sql.unsafe('select 1 as a; select 2 as b').simple();
    expect(multi.length === 2 && multi[0][0].a === 1 && multi[1][0].b === 2, `multi-statement ${JSON.stringify(multi)}`);
    // Tagged-template parameters: the extended protocol, typed by Describe, values of many types.
    const when = new Date('2024-05-06T07:08:09.123Z');
    const bytes = Buffer.from([0, 1, 255, 98]);
    const [r] = await sql`
      select ${41}::int + 1 as i, ${'héllo'}::text || '!' as t, ${bytes}::bytea as b,
             ${when}::timestamptz as ts, ${sql.json({ k: [1, null] })}::jsonb as j,
             ${sql.array([1, 2, 3])}::int[] as arr, ${true}::bool as flag, ${null}::text as nul,
             ${'9007199254740993'}::bigint as big, current_setting('application_name') as app`;
    expect(r.i === 42 && r.t === 'héllo!', `int/text ${r.i} ${r.t}`);
    expect(Buffer.compare(r.b, bytes) === 0, `bytea ${r.b && r.b.toString('hex')}`);
    expect(r.ts.getTime() === when.getTime(), `timestamptz ${r.ts}`);
    expect(JSON.stringify(r.j) === '{"k":[1,null]}', `jsonb ${JSON.stringify(r.j)}`);
    expect(JSON.stringify(r.arr) === '[1,2,3]' && r.flag === true && r.nul === null, 'array/bool/null');
    expect(r.big === '9007199254740993', `bigint ${r.big}`);
    expect(r.app === 'postgres-js-compat', `application_name ${r.app}`);
    // Dynamic inserts with the sql() helper, then a 3 MiB value.
    await sql`create temp table q ${sql.unsafe('(id int primary key, v text)')}`;
    await sql`insert into q ${sql([{ id: 1, v: 'one' }, { id: 2, v: 'two' }])}`;
    const big = 'x'.repeat(3 << 20);
    const [len] = await sql`select length(${big}) as n, (select count(*)::int from q) as rows`;
    expect(len.n === big.length && len.rows === 2, `3 MiB parameter ${len.n}, rows ${len.rows}`);
    // Queries issued together are pipelined on the one connection.
    const many = await Promise.all(Array.from({ length: 50 }, (_, i) => sql`select ${i}::int as i`));
    expect(many.every((rows, i) => rows[0].i === i), 'pipelined results in order');
    // A cursor: Execute with a row limit, PortalSuspended between batches.
    let seen = 0;
    await sql`select g from generate_series(1, 1000) g`.cursor(100, (rows) => { seen += rows.length; });
    expect(seen === 1000, `cursor rows ${seen}`);
    return { pipelined: many.length, cursor_rows: seen };
  });
}

async function preparedStatements() {
  const named = await withSql({}, async (sql) => {
    for (let i = 0; i < 10; i++) {
      const [row] = await sql`select ${i}::int * 2 as d`;
      expect(row.d === i * 2, `prepared result ${row.d}`);
    }
    // prepare: true (the default) names the statement and reuses it.
    const [p] = await sql`select count(*)::int as n from pg_prepared_statements where statement like 'select $1::int * 2%'`;
    expect(p.n === 1, `${p.n} named statements for 10 runs`);
    return p.n;
  });
  const unnamed = await withSql({ prepare: false }, async (sql) => {
    const [row] = await sql`select ${7}::int as v, (select count(*)::int from pg_prepared_statements) as n`;
    expect(row.v === 7 && row.n === 0, `prepare: false → unnamed statements (${row.n} named)`);
    return row.n;
  });
  return { named_statements: named, unnamed_mode_named: unnamed };
}

async function transactionsAndErrors() {
  return withSql({}, async (sql) => {
    await sql`create temp table tx (id int primary key, v text)`;
    await sql.begin(async (tx) => {
      await tx`insert into tx values (1, 'a'), (2, 'b')`;
      const err = await expectError(tx.savepoint(async (sp) => {
        await sp`insert into tx values (3, 'in savepoint')`;
        await sp`insert into tx values (1, 'duplicate')`;
      }), 'a duplicate key in a savepoint');
      expect(err.code === '23505', `savepoint error ${err.code}`);
      await tx`insert into tx values (4, 'after savepoint')`;
    });
    const rolled = await expectError(sql.begin(async (tx) => {
      await tx`insert into tx values (5, 'rolled back')`;
      throw new Error('roll back');
    }), 'a failing transaction');
    expect(rolled.message === 'roll back', `rollback reason ${rolled.message}`);
    const ids = (await sql`select id from tx order by id`).map((r) => r.id);
    expect(JSON.stringify(ids) === '[1,2,4]', `committed rows ${JSON.stringify(ids)}`);
    const codes = {};
    codes.unique_violation = (await expectError(sql`insert into tx values (${1}, 'dup')`, 'duplicate')).code;
    codes.division_by_zero = (await expectError(sql`select 1 / ${0}::int`, 'division by zero')).code;
    codes.syntax_error = (await expectError(sql`selec 1`, 'a syntax error')).code;
    codes.simple_division = (await expectError(sql.unsafe('select 1/0').simple(), 'simple 1/0')).code;
    expect(codes.unique_violation === '23505' && codes.division_by_zero === '22012'
      && codes.syntax_error === '42601' && codes.simple_division === '22012', `codes ${JSON.stringify(codes)}`);
    const [after] = await sql`select 3 as v`;
    expect(after.v === 3, 'the session goes on after errors');
    return { sqlstates: codes, ids };
  });
}

async function copy() {
  return withSql({}, async (sql) => {
    await sql`create temp table cp (a int, b text)`;
    const rows = Array.from({ length: 20000 }, (_, i) => `${i}\tr${i}\n`);
    const writable = await sql`copy cp from stdin`.writable();
    await pipeline(Readable.from(rows), writable);
    const [n] = await sql`select count(*)::int as n from cp`;
    expect(n.n === 20000, `COPY IN ${n.n} rows`);
    const chunks = [];
    const readable = await sql`copy (select a, b from cp where a < 3 order by a) to stdout`.readable();
    await pipeline(readable, new Writable({ write(c, _e, cb) { chunks.push(c); cb(); } }));
    const out = Buffer.concat(chunks).toString();
    expect(out === '0\tr0\n1\tr1\n2\tr2\n', `COPY OUT ${JSON.stringify(out)}`);
    // (A COPY the server rejects mid-stream is not checked: Postgres.js 3.4 keeps the
    // connection in its copy state after the ErrorResponse, against PostgreSQL too.)
    return { copy_in: n.n, copy_out: out.length };
  });
}

async function cancel() {
  return withSql({}, async (sql) => {
    const started = Date.now();
    const q = sql`select pg_sleep(30)`;
    q.execute();
    await new Promise((r) => setTimeout(r, 300));
    await q.cancel();
    const err = await expectError(q, 'pg_sleep(30) after cancel()');
    const took = Date.now() - started;
    expect(err.code === '57014', `cancel ${err.code} ${err.message}`);
    expect(took < 10000, `the cancel took ${took} ms`);
    const [row] = await sql`select 4 as v`;
    expect(row.v === 4, 'the session after the cancel');
    return { sqlstate: err.code, ms_to_cancel: took };
  });
}

async function listenNotify() {
  return withSql({ max: 2 }, async (sql) => {
    const got = [];
    let wake;
    const arrived = new Promise((r) => { wake = r; });
    const { state } = await sql.listen('lg_compat', (payload) => { got.push(payload); if (got.length === 2) wake(); });
    await sql.notify('lg_compat', 'hello');
    await sql`select pg_notify('lg_compat', ${'second'})`;
    await Promise.race([arrived, new Promise((_, reject) => setTimeout(() => reject(new Error(`notifications: ${got}`)), 10000))]);
    expect(JSON.stringify(got) === '["hello","second"]', `payloads ${JSON.stringify(got)}`);
    return { payloads: got, listener_key_pid: state && state.pid };
  });
}

async function directTls() {
  // sslnegotiation: 'direct': TLS at once (ALPN postgresql), no SSLRequest; its cancel
  // connection negotiates the same way.
  return withSql({ sslnegotiation: 'direct' }, async (sql) => {
    const [row] = await sql`select current_user::text as u`;
    expect(row.u !== env('LG_USER'), `session user ${row.u}`);
    const q = sql`select pg_sleep(30)`;
    q.execute();
    await new Promise((r) => setTimeout(r, 300));
    await q.cancel();
    const err = await expectError(q, 'pg_sleep(30) after cancel() over direct TLS');
    expect(err.code === '57014', `cancel over direct TLS: ${err.code} ${err.message}`);
    return { session_user: row.u, cancel: err.code };
  });
}

for (const [name, fn] of [
  ['verify_full_tls', verifyFullTls],
  ['queries', queries],
  ['prepared_statements', preparedStatements],
  ['transactions_and_errors', transactionsAndErrors],
  ['copy', copy],
  ['cancel', cancel],
  ['listen_notify', listenNotify],
  ['direct_tls', directTls],
]) {
  await check(name, fn);
}

result.ok = Object.values(result.checks).every((c) => c.ok);
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
