// node-postgres (`pg`, a pure-JavaScript protocol implementation, no libpq) through leasegate,
// verifying the server certificate against the CA and the host name, with a client certificate.
//
// Driven by tests/integration/compat_node.rs. Connection from the environment: LG_HOST (name
// the server certificate must match), LG_HOSTADDR, LG_PORT, LG_DBNAME, LG_USER (the Vault role),
// LG_SSLROOTCERT, LG_SSLCERT, LG_SSLKEY.
//
// Prints one JSON line {"ok": ..., "checks": {...}, versions...}; exits 0 only when every check
// passed. Install: npm ci --prefix tests/clients/node

import fs from 'node:fs';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
let pg;
try {
  pg = (await import('pg')).default;
} catch (e) {
  console.log(JSON.stringify({
    ok: false,
    error: `cannot load pg (${e.message}); run \`npm ci --prefix tests/clients/node\``,
  }));
  process.exit(2);
}

function packageVersion(name) {
  const path = require.resolve(name);
  const root = path.slice(0, path.lastIndexOf(`node_modules/${name}/`) + `node_modules/${name}/`.length);
  return JSON.parse(fs.readFileSync(`${root}package.json`, 'utf8')).version;
}

const result = {
  client: 'node-postgres',
  pg: packageVersion('pg'),
  pg_protocol: packageVersion('pg-protocol'),
  node: process.version,
  native: false,
  checks: {},
};

function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`environment variable ${name} is not set`);
  return v;
}

function config(overrides = {}) {
  const { ssl: sslOverrides, ...rest } = overrides;
  return {
    host: env('LG_HOSTADDR'),
    port: Number(env('LG_PORT')),
    user: env('LG_USER'),
    database: env('LG_DBNAME'),
    application_name: 'node-pg-compat',
    connectionTimeoutMillis: 15000,
    ssl: {
      ca: fs.readFileSync(env('LG_SSLROOTCERT')),
      cert: fs.readFileSync(env('LG_SSLCERT')),
      key: fs.readFileSync(env('LG_SSLKEY')),
      // Verify the certificate against this name (the host is an IP address).
      servername: env('LG_HOST'),
      rejectUnauthorized: true,
      ...sslOverrides,
    },
    ...rest,
  };
}

async function connect(overrides) {
  const client = new pg.Client(config(overrides));
  await client.connect();
  return client;
}

function expect(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

async function check(name, fn) {
  const started = process.hrtime.bigint();
  try {
    const details = (await fn()) || {};
    details.ok = true;
    details.ms = Number((process.hrtime.bigint() - started) / 1000000n);
    result.checks[name] = details;
  } catch (e) {
    result.checks[name] = { ok: false, error: `${e.name}: ${e.message}`, code: e.code, stack: e.stack };
  }
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

await check('verify_full_tls', async () => {
  const client = await connect();
  try {
    const socket = client.connection.stream;
    expect(socket.encrypted === true && socket.authorized === true, 'TLS socket authorized against the CA');
    const { rows } = await client.query('select current_user::text as u, version() as v');
    expect(rows[0].u !== env('LG_USER'), `session user ${rows[0].u} is a dynamic role`);
    const details = { tls_protocol: socket.getProtocol(), session_user: rows[0].u };
    // Negative control: a name the certificate does not carry must be refused.
    const wrong = new pg.Client(config({ ssl: { servername: 'wrong-name.invalid' } }));
    try {
      await wrong.connect();
      await wrong.end();
      throw new Error('a wrong server name was accepted');
    } catch (e) {
      expect(e.code === 'ERR_TLS_CERT_ALTNAME_INVALID', `wrong name refused by host check, got ${e.code}: ${e.message}`);
      details.wrong_host_refused = e.code;
    }
    return details;
  } finally {
    await client.end();
  }
});

await check('simple_query', async () => {
  const client = await connect();
  try {
    // No parameters: pg uses the simple query protocol; two statements give two results.
    const res = await client.query("select 1 as one; select 'two' as two");
    expect(Array.isArray(res) && res.length === 2, 'two result sets');
    expect(res[0].rows[0].one === 1 && res[1].rows[0].two === 'two', 'values');
    const big = await client.query("select repeat('z', 3 * 1024 * 1024) as s");
    expect(big.rows[0].s.length === 3 * 1024 * 1024, '3 MiB value');
    return { result_sets: res.length };
  } finally {
    await client.end();
  }
});

await check('parameterised_query', async () => {
  const client = await connect();
  try {
    const { rows } = await client.query('select $1::int + $2::int as sum, $3::text as t, $4::bytea as b',
      [40, 2, 'héllo ✓', Buffer.from([0, 1, 2, 255])]);
    expect(rows[0].sum === 42 && rows[0].t === 'héllo ✓', `values ${JSON.stringify(rows[0])}`);
    expect(Buffer.compare(rows[0].b, Buffer.from([0, 1, 2, 255])) === 0, 'bytea round trip');
    // A named prepared statement: parsed once, executed several times.
    for (let i = 0; i < 5; i++) {
      const r = await client.query({ name: 'compat_double', text: 'select $1::int * 2 as d', values: [i] });
      expect(r.rows[0].d === i * 2, `prepared execution ${i}`);
    }
    return { prepared_executions: 5 };
  } finally {
    await client.end();
  }
});

await check('transaction', async () => {
  const client = await connect();
  try {
    await client.query('create temp table t (id int primary key, v text)');
    await client.query('BEGIN');
    await client.query('insert into t values ($1, $2)', [1, 'committed']);
    await client.query('COMMIT');
    await client.query('BEGIN');
    await client.query('insert into t values ($1, $2)', [2, 'rolled back']);
    await client.query('ROLLBACK');
    // An error inside a transaction aborts it until ROLLBACK.
    await client.query('BEGIN');
    let code;
    try {
      await client.query('insert into t values (1, $1)', ['duplicate']);
    } catch (e) {
      code = e.code;
    }
    expect(code === '23505', `duplicate key gives 23505, got ${code}`);
    let aborted;
    try {
      await client.query('select 1');
    } catch (e) {
      aborted = e.code;
    }
    expect(aborted === '25P02', `statements in an aborted transaction give 25P02, got ${aborted}`);
    await client.query('ROLLBACK');
    const { rows } = await client.query('select array_agg(id order by id) as ids from t');
    expect(JSON.stringify(rows[0].ids) === '[1]', `rows ${JSON.stringify(rows[0].ids)}`);
    return { ids: rows[0].ids };
  } finally {
    await client.end();
  }
});

await check('listen_notify', async () => {
  const listener = await connect();
  const notifier = await connect();
  try {
    const received = new Promise((resolve) => {
      listener.on('notification', (msg) => {
        if (msg.channel === 'compat_node') resolve(msg);
      });
    });
    await listener.query('LISTEN compat_node');
    await notifier.query("select pg_notify('compat_node', $1)", ['payload from node ✓']);
    const msg = await withTimeout(received, 10000, 'notification');
    expect(msg.payload === 'payload from node ✓', `payload ${msg.payload}`);
    // Its own notification names the pid of its BackendKeyData (client.processID).
    const own = new Promise((resolve) => {
      listener.on('notification', (m) => {
        if (m.channel === 'compat_node' && m.payload === 'own') resolve(m);
      });
    });
    await listener.query("NOTIFY compat_node, 'own'");
    const mine = await withTimeout(own, 10000, 'own notification');
    expect(mine.processId === listener.processID, `own pid ${mine.processId} vs key ${listener.processID}`);
    return { channel: msg.channel, payload: msg.payload, own_pid: mine.processId };
  } finally {
    await listener.end();
    await notifier.end();
  }
});

await check('error_then_usable', async () => {
  const client = await connect();
  try {
    let err;
    try {
      await client.query('SELEC 1');
    } catch (e) {
      err = e;
    }
    expect(err && err.code === '42601', `syntax error gives 42601, got ${err && err.code}`);
    expect(err.severity === 'ERROR' && Number(err.position) === 1, `severity ${err.severity}, position ${err.position}`);
    const { rows } = await client.query('select 1 as one');
    expect(rows[0].one === 1, 'session usable after the error');
    let err2;
    try {
      await client.query('select $1::int', ['not a number']);
    } catch (e) {
      err2 = e;
    }
    expect(err2 && err2.code === '22P02', `bad parameter gives 22P02, got ${err2 && err2.code}`);
    const again = await client.query('select $1::int as n', [7]);
    expect(again.rows[0].n === 7, 'usable after an extended-protocol error');
    return { sqlstate: err.code, message: err.message };
  } finally {
    await client.end();
  }
});

result.ok = Object.values(result.checks).every((c) => c.ok);
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
