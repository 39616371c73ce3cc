<?php
// PHP's pgsql extension and PDO_pgsql (both on the system libpq) through leasegate with
// sslmode=verify-full and a client certificate.
//
// Driven by tests/integration/compat_php.rs. The connection comes from the environment:
// LG_HOST (name the server certificate must match), LG_HOSTADDR, LG_PORT, LG_DBNAME, LG_USER
// (the Vault role), LG_SSLROOTCERT, LG_SSLCERT, LG_SSLKEY.
//
// Prints one JSON line {"ok": ..., "checks": {...}, versions...} and exits 0 only when every
// check passed. Install: apt-get install php-cli php-pgsql (Debian).

declare(strict_types=1);

if (!function_exists('pg_connect') || !extension_loaded('pdo_pgsql')) {
    echo json_encode(['ok' => false, 'error' => 'the pgsql and pdo_pgsql extensions are not loaded; '
        . 'apt-get install php-cli php-pgsql']), "\n";
    exit(2);
}

// Never a password from the environment or a file: a connection that works has none.
putenv('PGPASSWORD');
putenv('PGPASSFILE=/nonexistent/leasegate-compat-pgpass');

$RESULT = ['client' => 'php', 'php' => PHP_VERSION, 'checks' => []];

function env(string $name): string
{
    $v = getenv($name);
    if ($v === false || $v === '') {
        throw new RuntimeException("environment variable $name is not set");
    }
    return $v;
}

/** libpq keywords for a session through leasegate; $override replaces or adds any. */
function params(array $override = []): array
{
    return array_merge([
        'host' => env('LG_HOST'), 'hostaddr' => env('LG_HOSTADDR'), 'port' => env('LG_PORT'),
        'dbname' => env('LG_DBNAME'), 'user' => env('LG_USER'),
        'sslmode' => 'verify-full', 'sslrootcert' => env('LG_SSLROOTCERT'),
        'sslcert' => env('LG_SSLCERT'), 'sslkey' => env('LG_SSLKEY'),
        'connect_timeout' => '15', 'application_name' => 'php-pgsql-compat',
    ], $override);
}

/** A libpq connection string (values quoted) of params($override). */
function conninfo(array $override = []): string
{
    $parts = [];
    foreach (params($override) as $k => $v) {
        $parts[] = $k . "='" . addcslashes($v, "'\\") . "'";
    }
    return implode(' ', $parts);
}

/** A new pgsql connection (never one pg_connect reuses). */
function connect(array $override = []): PgSql\Connection
{
    $c = @pg_connect(conninfo($override), PGSQL_CONNECT_FORCE_NEW);
    if ($c === false) {
        throw new RuntimeException('pg_connect: ' . (error_get_last()['message'] ?? '?'));
    }
    return $c;
}

function expect(bool $cond, string $what): void
{
    if (!$cond) {
        throw new RuntimeException("check failed: $what");
    }
}

function check(string $name, callable $fn): void
{
    global $RESULT;
    $started = hrtime(true);
    try {
        $details = $fn() ?? [];
        $details['ok'] = true;
        $details['ms'] = intdiv(hrtime(true) - $started, 1000000);
    } catch (Throwable $e) {
        $details = ['ok' => false, 'error' => get_class($e) . ': ' . $e->getMessage(),
            'code' => $e->getCode(), 'trace' => explode("\n", $e->getTraceAsString())];
    }
    $RESULT['checks'][$name] = $details;
}

/** The single value of `sql`. */
function one(PgSql\Connection $c, string $sql, array $params = []): ?string
{
    $r = $params ? pg_query_params($c, $sql, $params) : pg_query($c, $sql);
    expect($r !== false, "$sql: " . pg_last_error($c));
    return pg_fetch_result($r, 0, 0);
}

/** The SQLSTATE `sql` fails with, run with pg_send_query (or pg_send_query_params). */
function sqlstate_of(PgSql\Connection $c, string $sql, ?array $params = null): ?string
{
    $sent = $params === null ? pg_send_query($c, $sql) : pg_send_query_params($c, $sql, $params);
    expect($sent, "send $sql");
    $res = pg_get_result($c);
    expect($res !== false, "a result for $sql");
    expect(pg_result_status($res) === PGSQL_FATAL_ERROR, "$sql failed");
    $state = pg_result_error_field($res, PGSQL_DIAG_SQLSTATE);
    while (pg_get_result($c) !== false) {
    }
    return $state === false ? null : $state;
}

check('verify_full_tls', function () {
    $c = connect();
    try {
        $r = pg_fetch_assoc(pg_query($c, 'select current_user::text as u, session_user::text as s'));
        expect($r['u'] === $r['s'] && $r['u'] !== env('LG_USER'),
            "session user {$r['u']} is a dynamic role, not the grant name " . env('LG_USER'));
        $v = pg_version($c);
        // No password in the connection string, none in the environment or a password file:
        // had leasegate asked for one, libpq would have failed ("no password supplied").
        $details = ['session_user' => $r['u'], 'libpq' => $v['client'], 'server' => $v['server'] ?? null,
            'password_in_conninfo' => str_contains(conninfo(), 'password')];
        expect(!$details['password_in_conninfo'], 'no password in the connection string');
        // pg_connection_reset: a new connection with the same parameters, so a new login.
        expect(pg_connection_reset($c), 'pg_connection_reset');
        $after = one($c, 'select current_user');
        expect($after !== $r['u'] && $after !== env('LG_USER'), "after reset: {$r['u']} → $after");
        $details['role_after_reset'] = $after;
    } finally {
        pg_close($c);
    }
    // Negative control: trusting only the system's CAs, leasegate's certificate is refused.
    try {
        pg_close(connect(['sslrootcert' => '/etc/ssl/certs/ca-certificates.crt']));
        throw new LogicException('a server certificate from an untrusted CA was accepted');
    } catch (RuntimeException $e) {
        expect(str_contains($e->getMessage(), 'certificate verify failed'), 'wrong CA: ' . $e->getMessage());
        $details['untrusted_ca_refused'] = substr(trim($e->getMessage()), 0, 200);
    }
    return $details;
});

check('queries', function () {
    $c = connect();
    try {
        $r = pg_query($c, "select 1 as one; select 'two' as two");
        expect(pg_fetch_result($r, 0, 0) === 'two', 'multi-statement: the last result');
        $r = pg_fetch_assoc(pg_query_params($c, 'select $1::int + $2::int as sum, $3::text as t',
            [40, 2, 'héllo ✓']));
        expect($r === ['sum' => '42', 't' => 'héllo ✓'], 'pg_query_params ' . json_encode($r));
        expect(pg_prepare($c, 'compat_double', 'select $1::int * 2 as d') !== false, 'pg_prepare');
        $got = [];
        for ($i = 0; $i < 5; $i++) {
            $got[] = (int) pg_fetch_result(pg_execute($c, 'compat_double', [$i]), 0, 0);
        }
        expect($got === [0, 2, 4, 6, 8], 'pg_execute ' . json_encode($got));
        $n = one($c, "select count(*) from pg_prepared_statements where name = 'compat_double'");
        expect($n === '1', 'a server-side prepared statement');
        return ['prepared_executions' => count($got)];
    } finally {
        pg_close($c);
    }
});

check('transactions', function () {
    $c = connect();
    try {
        pg_query($c, 'create temp table tx (id int primary key, v text)');
        pg_query($c, 'begin');
        pg_query($c, "insert into tx values (1, 'a'), (2, 'b')");
        pg_query($c, 'commit');
        pg_query($c, 'begin');
        pg_query($c, "insert into tx values (3, 'rolled back')");
        pg_query($c, 'rollback');
        pg_query($c, 'begin');
        pg_query($c, "insert into tx values (6, 'outer')");
        pg_query($c, 'savepoint sp');
        pg_query($c, "insert into tx values (7, 'inner')");
        // An error inside the savepoint: the transaction is aborted until rolled back to it.
        $state = sqlstate_of($c, 'insert into tx values (6, $1)', ['duplicate']);
        expect($state === '23505', "duplicate in the savepoint: $state");
        expect(pg_transaction_status($c) === PGSQL_TRANSACTION_INERROR, 'transaction aborted');
        pg_query($c, 'rollback to savepoint sp');
        pg_query($c, "insert into tx values (8, 'after the savepoint')");
        pg_query($c, 'commit');
        $ids = array_map('intval', pg_fetch_all_columns(pg_query($c, 'select id from tx order by id')));
        expect($ids === [1, 2, 6, 8], 'committed rows ' . json_encode($ids));
        return ['ids' => $ids];
    } finally {
        pg_close($c);
    }
});

check('errors', function () {
    $c = connect();
    try {
        pg_query($c, 'create temp table u (id int primary key)');
        pg_query($c, 'insert into u values (1)');
        $dup = sqlstate_of($c, 'insert into u values (1)');
        expect($dup === '23505', "duplicate key: $dup");
        expect(one($c, 'select 2') === '2', 'usable after 23505');
        $div = sqlstate_of($c, 'select 1/0');
        expect($div === '22012', "division by zero: $div");
        $ext = sqlstate_of($c, 'select $1::int / 0', [1]);
        expect($ext === '22012', "division by zero (extended protocol): $ext");
        $syntax = sqlstate_of($c, 'selec 1');
        expect($syntax === '42601', "syntax error: $syntax");
        // pg_query of a failing statement: false, and the message from pg_last_error.
        $r = @pg_query($c, 'select 1/0');
        expect($r === false && str_contains(pg_last_error($c), 'division by zero'), 'pg_query false');
        expect(one($c, 'select $1::int', [3]) === '3', 'usable after errors');
        return ['unique_violation' => $dup, 'division_by_zero' => $div, 'syntax_error' => $syntax];
    } finally {
        pg_close($c);
    }
});

check('copy', function () {
    $c = connect();
    try {
        pg_query($c, 'create temp table cp (a int, b text)');
        $rows = [];
        for ($i = 0; $i < 500; $i++) {
            $rows[] = "$i\tr$i\n";
        }
        expect(pg_copy_from($c, 'cp', $rows), 'pg_copy_from: ' . pg_last_error($c));
        $n = one($c, 'select count(*) from cp');
        expect($n === '500', "COPY FROM STDIN loaded $n rows");
        $out = pg_copy_to($c, 'cp');
        expect(is_array($out) && count($out) === 500 && $out[2] === "2\tr2\n",
            'pg_copy_to ' . json_encode(is_array($out) ? array_slice($out, 0, 3) : $out));
        // A COPY that fails (a bad row) returns false and leaves the session usable.
        expect(@pg_copy_from($c, 'cp', ["x\ty\n"]) === false, 'a bad COPY row was accepted');
        expect(one($c, 'select 1') === '1', 'usable after a failed COPY');
        return ['rows_in' => (int) $n, 'rows_out' => count($out)];
    } finally {
        pg_close($c);
    }
});

check('cancel', function () {
    $c = connect();
    $w = connect();
    try {
        $key = random_int(1, 2 ** 31 - 1);
        pg_query($c, 'begin');
        expect(pg_send_query($c, "select pg_advisory_xact_lock($key), pg_sleep(30)"), 'send pg_sleep');
        $deadline = microtime(true) + 15;
        while (one($w, "select count(*) from pg_locks where locktype = 'advisory' and granted "
            . 'and classid = 0 and objid = $1', [$key]) === '0') {
            expect(microtime(true) < $deadline, 'the sleeping statement never started');
            usleep(50000);
        }
        $sent = microtime(true);
        // pg_cancel_query: libpq's PQrequestCancel (a plaintext CancelRequest), then it reads
        // the statement's results until it ends.
        expect(pg_cancel_query($c), 'pg_cancel_query');
        $ms = (int) round((microtime(true) - $sent) * 1000);
        expect($ms < 15000, "the statement ran on for $ms ms after the cancel");
        // The statement failed (the transaction is aborted), it did not complete.
        expect(pg_transaction_status($c) === PGSQL_TRANSACTION_INERROR, 'the cancelled statement failed');
        pg_query($c, 'rollback');
        expect(one($c, 'select 42') === '42', 'usable after the cancel');
        // With nothing running: returns at once, and the session is not disturbed.
        expect(pg_cancel_query($c), 'pg_cancel_query while idle');
        expect(one($c, 'select 43') === '43', 'usable after an idle cancel');
        return ['cancel_to_end_ms' => $ms];
    } finally {
        pg_close($c);
        pg_close($w);
    }
});

check('startup_settings_and_notify', function () {
    $c = connect(['application_name' => 'php-compat-app',
        'options' => '-c search_path=pg_catalog,public -c statement_timeout=7s']);
    $n = connect();
    try {
        $app = one($c, 'show application_name');
        $path = one($c, 'show search_path');
        expect($app === 'php-compat-app', "application_name $app");
        expect(str_replace(' ', '', $path) === 'pg_catalog,public', "search_path $path");
        expect(one($c, 'show statement_timeout') === '7s', 'statement_timeout');
        expect(pg_parameter_status($c, 'application_name') === 'php-compat-app', 'ParameterStatus');
        pg_query($c, 'listen compat_php');
        pg_query_params($n, "select pg_notify('compat_php', $1)", ['payload from php ✓']);
        $deadline = microtime(true) + 10;
        while (($msg = pg_get_notify($c, PGSQL_ASSOC)) === false) {
            expect(microtime(true) < $deadline, 'no notification within 10 s');
            $sock = [pg_socket($c)];
            $none = null;
            stream_select($sock, $none, $none, 0, 100000);
        }
        expect($msg['message'] === 'compat_php' && $msg['payload'] === 'payload from php ✓',
            'notification ' . json_encode($msg));
        // Its own notification carries pg_get_pid() (the pid of leasegate's key).
        pg_query($c, "notify compat_php, 'own'");
        $own = pg_get_notify($c, PGSQL_ASSOC);
        expect(is_array($own) && $own['payload'] === 'own' && (int) $own['pid'] === pg_get_pid($c),
            'own notification ' . json_encode($own) . ' vs pg_get_pid ' . pg_get_pid($c));
        return ['application_name' => $app, 'search_path' => $path, 'notification' => $msg['payload']];
    } finally {
        pg_close($c);
        pg_close($n);
    }
});

/** A PDO connection through leasegate (DSN keywords are libpq's), errors as exceptions. */
function pdo(array $attrs = []): PDO
{
    $dsn = 'pgsql:' . implode(';', array_map(fn ($k, $v) => "$k=$v", array_keys(params()), params()));
    return new PDO($dsn, null, null, [PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION] + $attrs);
}

check('pdo', function () {
    $db = pdo();
    $user = $db->query('select current_user')->fetchColumn();
    expect($user !== env('LG_USER'), "PDO session user $user is a dynamic role");
    $db->exec('create temp table p (id int primary key, v text)');
    $details = ['session_user' => $user, 'client_version' => $db->getAttribute(PDO::ATTR_CLIENT_VERSION)];
    // Native prepares (the default, and ATTR_EMULATE_PREPARES false): a server-side statement.
    // Emulated: PDO interpolates the values and no statement is prepared on the server.
    foreach (['native' => false, 'emulated' => true] as $kind => $emulate) {
        $db->setAttribute(PDO::ATTR_EMULATE_PREPARES, $emulate);
        $before = (int) $db->query('select count(*) from pg_prepared_statements')->fetchColumn();
        $ins = $db->prepare('insert into p values (?, ?)');
        $base = $emulate ? 100 : 0;
        for ($i = 1; $i <= 3; $i++) {
            $ins->execute([$base + $i, "$kind $i"]);
        }
        $sel = $db->prepare('select v from p where id = :id');
        $sel->execute([':id' => $base + 2]);
        expect($sel->fetchColumn() === "$kind 2", "$kind prepared select");
        $during = (int) $db->query('select count(*) from pg_prepared_statements')->fetchColumn();
        expect($emulate ? $during === $before : $during >= $before + 1,
            "$kind prepares: $before server-side statements before, $during after");
        $details[$kind . '_server_statements'] = $during - $before;
        $ins = $sel = null;
        try {
            $dup = $db->prepare('insert into p values (?, ?)');
            $dup->execute([$base + 1, 'duplicate']);
            throw new LogicException("$kind: duplicate key accepted");
        } catch (PDOException $e) {
            expect($e->getCode() === '23505', "$kind: PDOException code {$e->getCode()}");
            $details[$kind . '_code'] = $e->getCode();
        }
    }
    try {
        $db->query('select 1/0');
        throw new LogicException('division by zero accepted');
    } catch (PDOException $e) {
        expect($e->getCode() === '22012' && $e->errorInfo[0] === '22012', "22012: {$e->getCode()}");
    }
    $db->beginTransaction();
    $db->exec("insert into p values (50, 'rolled back')");
    expect($db->inTransaction(), 'in a transaction');
    $db->rollBack();
    $db->beginTransaction();
    $db->exec("insert into p values (51, 'committed')");
    $db->commit();
    $ids = array_map('intval', $db->query('select id from p order by id')->fetchAll(PDO::FETCH_COLUMN));
    expect($ids === [1, 2, 3, 51, 101, 102, 103], 'rows ' . json_encode($ids));
    $details['ids'] = $ids;
    return $details;
});

check('pdo_copy_and_notify', function () {
    $db = pdo();
    $other = pdo();
    $db->exec('create temp table pc (a int, b text)');
    $rows = array_map(fn ($i) => "$i\tr$i", range(1, 300));
    expect($db->pgsqlCopyFromArray('pc', $rows), 'pgsqlCopyFromArray');
    $out = $db->pgsqlCopyToArray('pc');
    expect(is_array($out) && count($out) === 300 && $out[0] === "1\tr1\n", 'pgsqlCopyToArray');
    $db->exec('listen compat_pdo');
    $other->exec("notify compat_pdo, 'from pdo'");
    $msg = $db->pgsqlGetNotify(PDO::FETCH_ASSOC, 10000);
    expect(is_array($msg) && $msg['message'] === 'compat_pdo' && $msg['payload'] === 'from pdo',
        'pgsqlGetNotify ' . json_encode($msg));
    return ['rows_out' => count($out), 'notification' => $msg['payload']];
});

$RESULT['ok'] = count($RESULT['checks']) > 0
    && array_reduce($RESULT['checks'], fn ($ok, $c) => $ok && $c['ok'] === true, true);
echo json_encode($RESULT, JSON_UNESCAPED_UNICODE | JSON_UNESCAPED_SLASHES), "\n";
exit($RESULT['ok'] ? 0 : 1);
