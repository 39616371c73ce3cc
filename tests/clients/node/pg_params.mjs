// node-postgres (`pg`) startup parameters through leasegate: what pg sends for its config keys
// (`options` with backslash escapes, statement_timeout, lock_timeout,
// idle_in_transaction_session_timeout, application_name, fallback_application_name,
// client_encoding) reaches the server, and `options` with post_auth_delay or -W is refused
// with 42501.
//
// Driven by tests/integration/sec_params.rs; the connection comes from the same LG_* variables
// as pg_compat.mjs. Prints one JSON line {"ok": ..., "checks": {...}}; exits 0 only when every
// check passed.

import fs from 'node:fs';

let pg;
try {
  pg = (await import('pg')).default;
} catch (e) {
  console.log(JSON.stringify({ ok: false, error: `cannot load pg (${e.message})` }));
  process.exit(2);
}

const result = { client: 'node-postgres', checks: {} };

function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`environment variable ${name} is not set`);
  return v;
}

async function connect(extra) {
  const client = new pg.Client({
    host: env('LG_HOSTADDR'),
    port: Number(env('LG_PORT')),
    user: env('LG_USER'),
    database: env('LG_DBNAME'),
    connectionTimeoutMillis: 15000,
    ssl: {
      ca: fs.readFileSync(env('LG_SSLROOTCERT')),
      cert: fs.readFileSync(env('LG_SSLCERT')),
      key: fs.readFileSync(env('LG_SSLKEY')),
      servername: env('LG_HOST'),
      rejectUnauthorized: true,
    },
    ...extra,
  });
  await client.connect();
  return client;
}

async function settings(client, names) {
  const cols = names.map((_, i) => `current_setting($${i + 1}) as c${i}`).join(', ');
  const row = (await client.query(`select ${cols}`, names)).rows[0];
  return Object.fromEntries(names.map((n, i) => [n, row[`c${i}`]]));
}

function expect(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

async function check(name, fn) {
  try {
    result.checks[name] = { ...((await fn()) || {}), ok: true };
  } catch (e) {
    result.checks[name] = { ok: false, error: `${e.name}: ${e.message}`, code: e.code };
  }
}

await check('allowed', async () => {
  const client = await connect({
    application_name: 'node-pg-params',
    options: '-c search_path=a\\,\\ b --lock-timeout=4321',
    statement_timeout: 1234,
    idle_in_transaction_session_timeout: 5678,
  });
  try {
    const got = await settings(client, [
      'application_name', 'search_path', 'lock_timeout', 'statement_timeout',
      'idle_in_transaction_session_timeout', 'client_encoding',
    ]);
    const want = {
      application_name: 'node-pg-params',
      search_path: 'a, b',
      lock_timeout: '4321ms',
      statement_timeout: '1234ms',
      idle_in_transaction_session_timeout: '5678ms',
      client_encoding: 'UTF8',
    };
    expect(JSON.stringify(got) === JSON.stringify(want), `settings ${JSON.stringify(got)}`);
    return got;
  } finally {
    await client.end();
  }
});

await check('fallback_application_name', async () => {
  const client = await connect({ fallback_application_name: 'node-fallback' });
  try {
    const got = await settings(client, ['application_name']);
    expect(got.application_name === 'node-fallback', `application_name ${got.application_name}`);
    return got;
  } finally {
    await client.end();
  }
});

for (const [name, options] of [
  ['post_auth_delay_refused', '-c post_auth_delay=2'],
  ['switch_W_refused', '-W 2'],
]) {
  await check(name, async () => {
    let client;
    try {
      client = await connect({ options });
    } catch (e) {
      expect(e.code === '42501', `SQLSTATE ${e.code}: ${e.message}`);
      expect(e.message.includes('post_auth_delay'), `message names it: ${e.message}`);
      return { code: e.code, message: e.message };
    }
    await client.end();
    throw new Error(`options=${options} was accepted`);
  });
}

result.ok = Object.values(result.checks).every((c) => c.ok);
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
