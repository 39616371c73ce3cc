#!/usr/bin/env ruby
# frozen_string_literal: true

# Ruby's `pg` gem (on the system libpq) through leasegate with sslmode=verify-full and a client
# certificate.
#
# Driven by tests/integration/compat_ruby.rs. The connection comes from the environment:
# LG_HOST (name the server certificate must match), LG_HOSTADDR, LG_PORT, LG_DBNAME, LG_USER
# (the Vault role), LG_SSLROOTCERT, LG_SSLCERT, LG_SSLKEY.
#
# Prints one JSON line {"ok": ..., "checks": {...}, versions...} and exits 0 only when every
# check passed. Install: apt-get install ruby-pg (Debian).

require 'json'
require 'timeout'

begin
  require 'pg'
rescue LoadError => e
  puts JSON.generate(ok: false, error: "cannot load pg (#{e.message}); apt-get install ruby-pg")
  exit 2
end

# Never a password from the environment or a file: a connection that works has none.
ENV.delete('PGPASSWORD')
ENV['PGPASSFILE'] = '/nonexistent/leasegate-compat-pgpass'

RESULT = {
  client: 'ruby-pg',
  pg: PG::VERSION,
  libpq: PG.library_version,
  ruby: RUBY_VERSION,
  checks: {}
}

def env(name)
  v = ENV.fetch(name, '')
  raise "environment variable #{name} is not set" if v.empty?

  v
end

# libpq keywords for a session through leasegate; `override` replaces or adds any.
def params(**override)
  {
    host: env('LG_HOST'), hostaddr: env('LG_HOSTADDR'), port: env('LG_PORT'),
    dbname: env('LG_DBNAME'), user: env('LG_USER'),
    sslmode: 'verify-full', sslrootcert: env('LG_SSLROOTCERT'),
    sslcert: env('LG_SSLCERT'), sslkey: env('LG_SSLKEY'),
    connect_timeout: '15', application_name: 'ruby-pg-compat'
  }.merge(override)
end

def connect(**override)
  PG.connect(params(**override))
end

def with_conn(**override)
  conn = connect(**override)
  yield conn
ensure
  conn&.close
end

def expect(cond, what)
  raise "check failed: #{what}" unless cond
end

def check(name)
  started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  details = Timeout.timeout(60) { yield } || {}
  details[:ok] = true
  details[:ms] = ((Process.clock_gettime(Process::CLOCK_MONOTONIC) - started) * 1000).round
  RESULT[:checks][name] = details
rescue StandardError, Timeout::Error => e
  RESULT[:checks][name] = { ok: false, error: "#{e.class}: #{e.message}",
                            backtrace: e.backtrace&.first(8) }
end

check('verify_full_tls') do
  with_conn do |c|
    expect(c.ssl_in_use?, 'TLS in use')
    row = c.exec('select current_user::text as u, session_user::text as s').first
    expect(row['u'] == row['s'] && row['u'] != env('LG_USER'),
           "session user #{row['u']} is a dynamic role, not the grant name #{env('LG_USER')}")
    # No password: none in the parameters, none asked for, none known to the client.
    expect(!c.connection_used_password, 'leasegate asked the client for a password')
    expect(c.pass.to_s.empty?, 'the connection holds a password')
    details = { session_user: row['u'], tls_protocol: c.ssl_attribute('protocol'),
                server_version: c.server_version }
    # Negative control: trusting only the system's CAs, leasegate's certificate is refused.
    begin
      connect(sslrootcert: '/etc/ssl/certs/ca-certificates.crt').close
      raise 'a server certificate from an untrusted CA was accepted'
    rescue PG::ConnectionBad => e
      expect(e.message.include?('certificate verify failed'), "wrong CA refused: #{e.message}")
      details[:untrusted_ca_refused] = e.message.strip[0, 200]
    end
    details
  end
end

check('queries') do
  with_conn do |c|
    # Simple protocol, two statements: the last result is returned.
    r = c.exec("select 1 as one; select 'two' as two")
    expect(r.getvalue(0, 0) == 'two', "multi-statement result #{r.values}")
    # Extended protocol, text results.
    r = c.exec_params('select $1::int + $2::int as sum, $3::text as t', [40, 2, 'héllo ✓'])
    expect(r[0] == { 'sum' => '42', 't' => 'héllo ✓' }, "exec_params #{r[0]}")
    # Binary result format: an int4 as 4 big-endian bytes, bytea as raw bytes.
    r = c.exec_params('select $1::int * 2 as d, $2::bytea as b',
                      [21, { value: "\x00\x01\xff".b, format: 1 }], 1)
    expect(r.getvalue(0, 0).unpack1('l>') == 42, "binary int4 #{r.getvalue(0, 0).inspect}")
    expect(r.getvalue(0, 1) == "\x00\x01\xff".b, "binary bytea #{r.getvalue(0, 1).inspect}")
    expect(r.fformat(0) == 1, 'result column in binary format')
    # Named prepared statement: parsed once, executed several times.
    c.prepare('compat_double', 'select $1::int * 2 as d')
    got = (0...5).map { |i| c.exec_prepared('compat_double', [i]).getvalue(0, 0).to_i }
    expect(got == [0, 2, 4, 6, 8], "exec_prepared #{got}")
    desc = c.describe_prepared('compat_double')
    expect(desc.nparams == 1 && desc.fname(0) == 'd', 'describe_prepared')
    { prepared_executions: got.size }
  end
end

check('transactions') do
  with_conn do |c|
    c.exec('create temp table tx (id int primary key, v text)')
    c.transaction do
      c.exec("insert into tx values (1, 'a'), (2, 'b')")
    end
    begin
      c.transaction do
        c.exec("insert into tx values (3, 'rolled back')")
        raise ArgumentError, 'abort the block'
      end
    rescue ArgumentError
      nil
    end
    c.transaction do
      c.exec("insert into tx values (6, 'outer')")
      c.exec('savepoint sp')
      c.exec("insert into tx values (7, 'inner')")
      c.exec('rollback to savepoint sp')
      c.exec("insert into tx values (8, 'after the savepoint')")
    end
    ids = c.exec('select id from tx order by id').column_values(0).map(&:to_i)
    expect(ids == [1, 2, 6, 8], "committed rows #{ids}")
    { ids: ids }
  end
end

# The error `sql` raises (an exception of class `klass`) and its SQLSTATE.
def sqlstate_of(conn, klass, sql)
  conn.exec(sql)
  raise "#{sql} succeeded"
rescue klass => e
  e.result.error_field(PG::PG_DIAG_SQLSTATE)
end

check('errors') do
  with_conn do |c|
    c.exec('create temp table u (id int primary key)')
    c.exec('insert into u values (1)')
    dup = sqlstate_of(c, PG::UniqueViolation, 'insert into u values (1)')
    expect(dup == '23505', "duplicate key: #{dup}")
    expect(c.exec('select 2').getvalue(0, 0) == '2', 'usable after 23505')
    div = sqlstate_of(c, PG::DivisionByZero, 'select 1/0')
    expect(div == '22012', "division by zero: #{div}")
    # The same through the extended protocol, then a syntax error.
    begin
      c.exec_params('select $1::int / 0', [1])
      raise 'division by zero accepted'
    rescue PG::DivisionByZero => e
      expect(e.result.error_field(PG::PG_DIAG_SQLSTATE) == '22012', 'extended protocol 22012')
    end
    syntax = sqlstate_of(c, PG::SyntaxError, 'selec 1')
    expect(syntax == '42601', "syntax error: #{syntax}")
    expect(c.exec_params('select $1::int', [3]).getvalue(0, 0) == '3', 'usable after errors')
    { unique_violation: dup, division_by_zero: div, syntax_error: syntax }
  end
end

check('copy') do
  with_conn do |c|
    c.exec('create temp table cp (a int, b text)')
    c.copy_data('copy cp from stdin') do
      500.times { |i| c.put_copy_data("#{i}\tr#{i}\n") }
    end
    n = c.exec('select count(*) from cp').getvalue(0, 0).to_i
    expect(n == 500, "COPY FROM STDIN loaded #{n} rows")
    out = +''
    c.copy_data('copy (select a, b from cp where a < 3 order by a) to stdout') do
      while (line = c.get_copy_data)
        out << line
      end
    end
    expect(out == "0\tr0\n1\tr1\n2\tr2\n", "COPY TO STDOUT #{out.inspect}")
    # A COPY that fails part-way (a bad row) leaves the session usable.
    begin
      c.copy_data('copy cp from stdin') { c.put_copy_data("x\ty\n") }
      raise 'a bad COPY row was accepted'
    rescue PG::InvalidTextRepresentation => e
      expect(e.result.error_field(PG::PG_DIAG_SQLSTATE) == '22P02', 'bad COPY row 22P02')
    end
    expect(c.exec('select 1').getvalue(0, 0) == '1', 'usable after a failed COPY')
    { rows_in: n, bytes_out: out.bytesize }
  end
end

# Starts pg_sleep(30) on `conn` with send_query, waits (on `watcher`) until it holds its
# advisory lock, calls `cancel`, and returns the SQLSTATE the statement ended with.
def cancel_sleep(conn, watcher)
  key = rand(1..(2**31 - 1))
  conn.send_query("select pg_advisory_xact_lock(#{key}), pg_sleep(30)")
  deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 15
  loop do
    held = watcher.exec_params("select count(*) from pg_locks where locktype = 'advisory' " \
                               'and granted and classid = 0 and objid = $1', [key])
    break if held.getvalue(0, 0) != '0'
    raise 'the sleeping statement never started' if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

    sleep 0.05
  end
  sent = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  error = yield
  raise "cancel failed: #{error}" if error

  # The statement ends (57014) well before its 30 s.
  raise 'the statement did not end after the cancel' unless conn.block(15)

  res = conn.get_result
  state = res&.error_field(PG::PG_DIAG_SQLSTATE)
  nil while conn.get_result
  [state, ((Process.clock_gettime(Process::CLOCK_MONOTONIC) - sent) * 1000).round]
end

check('cancel') do
  with_conn do |c|
    with_conn do |w|
      details = {}
      # pg's own cancel (Connection#cancel, the default async API: a CancelRequest on a new
      # plain TCP connection to the same address, waiting for it to be closed) and libpq's
      # PQcancel (Connection#sync_cancel).
      { cancel: -> { c.cancel }, sync_cancel: -> { c.sync_cancel } }.each do |name, fn|
        state, ms = cancel_sleep(c, w) { fn.call }
        expect(state == '57014', "#{name}: the statement ended with #{state.inspect}")
        expect(c.exec('select 42').getvalue(0, 0) == '42', "#{name}: session usable after")
        details[name] = { sqlstate: state, cancel_to_error_ms: ms }
      end
      details[:sqlstate] = details[:cancel][:sqlstate]
      # A cancel with nothing running: answered by closing the connection, as PostgreSQL does
      # (pg's cancel waits for that close), and the session is not disturbed.
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      Timeout.timeout(10) do
        expect(c.cancel.nil?, 'cancel while idle')
        expect(c.sync_cancel.nil?, 'sync_cancel while idle')
      end
      details[:idle_cancel_ms] = ((Process.clock_gettime(Process::CLOCK_MONOTONIC) - started) * 1000).round
      expect(c.exec('select 43').getvalue(0, 0) == '43', 'session usable after idle cancels')
      details
    end
  end
end

check('startup_settings') do
  with_conn(application_name: 'ruby-compat-app',
            options: '-c search_path=pg_catalog,public -c statement_timeout=7s') do |c|
    app = c.exec('show application_name').getvalue(0, 0)
    path = c.exec('show search_path').getvalue(0, 0)
    timeout = c.exec('show statement_timeout').getvalue(0, 0)
    expect(app == 'ruby-compat-app', "application_name #{app}")
    expect(path.delete(' ') == 'pg_catalog,public', "search_path #{path}")
    expect(timeout == '7s', "statement_timeout #{timeout}")
    expect(c.parameter_status('application_name') == 'ruby-compat-app', 'ParameterStatus')
    { application_name: app, search_path: path }
  end
end

check('target_session_attrs') do
  # libpq checks the server it reached (ParameterStatus, or a SHOW) before accepting it.
  %w[read-write primary].map do |attrs|
    with_conn(target_session_attrs: attrs) do |c|
      expect(c.exec('select 1').getvalue(0, 0) == '1', "target_session_attrs=#{attrs}")
      [attrs, { in_hot_standby: c.parameter_status('in_hot_standby'),
                default_transaction_read_only: c.parameter_status('default_transaction_read_only') }]
    end
  end.to_h
end

check('async_and_notify') do
  with_conn do |listener|
    with_conn do |notifier|
      # Async API: two statements sent at once, one result each, then nil.
      listener.send_query('select 1 as a; select 2 as b')
      results = []
      while (r = listener.get_result)
        results << r.getvalue(0, 0)
        r.clear
      end
      expect(results == %w[1 2], "send_query results #{results}")
      listener.send_query_params('select $1::text', ['p'])
      expect(listener.get_result.getvalue(0, 0) == 'p' && listener.get_result.nil?, 'send_query_params')
      listener.exec('listen compat_ruby')
      notifier.exec_params("select pg_notify('compat_ruby', $1)", ['payload from ruby ✓'])
      got = nil
      listener.wait_for_notify(10) { |channel, pid, payload| got = [channel, pid, payload] }
      expect(got, 'no notification within 10 s')
      expect(got[0] == 'compat_ruby' && got[2] == 'payload from ruby ✓', "notification #{got}")
      notifier_pid = notifier.exec('select pg_backend_pid()').getvalue(0, 0).to_i
      expect(got[1] == notifier_pid, "notifying backend pid #{got[1]}, not #{notifier_pid}")
      # Its own notification carries its backend_pid (the pid of leasegate's key).
      listener.exec("notify compat_ruby, 'own'")
      own = nil
      listener.wait_for_notify(10) { |_channel, pid, payload| own = [pid, payload] }
      expect(own && own[1] == 'own' && own[0] == listener.backend_pid,
             "own notification #{own.inspect}, backend_pid #{listener.backend_pid}")
      { results: results, channel: got[0], payload: got[2], key_data_pid: notifier.backend_pid,
        backend_pid: notifier_pid }
    end
  end
end

check('pipeline_and_reset') do
  with_conn do |c|
    # libpq 14+ pipeline mode: several extended-protocol queries sent before one Sync, one
    # failing; the queries after the error are skipped until the Sync.
    c.enter_pipeline_mode
    c.send_query_params('select $1::int', [1])
    c.send_query_params('select $1::int / 0', [1])
    c.send_query_params('select $1::int', [3])
    c.pipeline_sync
    statuses = []
    loop do
      r = c.get_result
      next if r.nil?

      statuses << r.res_status(r.result_status)
      break if r.result_status == PG::PGRES_PIPELINE_SYNC
    end
    c.exit_pipeline_mode
    want = %w[PGRES_TUPLES_OK PGRES_FATAL_ERROR PGRES_PIPELINE_ABORTED PGRES_PIPELINE_SYNC]
    expect(statuses == want, "pipeline results #{statuses}")
    # reset: a new connection with the same parameters, so a new login through leasegate.
    before = c.exec('select current_user').getvalue(0, 0)
    c.reset
    after = c.exec('select current_user').getvalue(0, 0)
    expect(after != before && after != env('LG_USER'), "after reset: #{before} → #{after}")
    { pipeline: statuses, roles: [before, after] }
  end
end

RESULT[:ok] = RESULT[:checks].values.all? { |c| c[:ok] }
puts JSON.generate(RESULT)
exit(RESULT[:ok] ? 0 : 1)
