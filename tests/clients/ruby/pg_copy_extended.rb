#!/usr/bin/env ruby
# frozen_string_literal: true

# COPY FROM STDIN through libpq's extended protocol (Ruby pg's exec_params: Parse, Bind,
# Describe, Execute, Sync; the server ignores that Sync in copy-in mode, then libpq ends the
# copy with CopyDone and another Sync), through leasegate with sslmode=verify-full: rows in, a
# failed one (22P02) recovered, COPY TO STDOUT the same way, then the sessions end at
# ReadyForQuery (tests/integration/compat_extended_copy.rs checks leasegate saw them idle).
#
# Connection from the LG_* variables, as pg_compat.rb. Prints one JSON line {"ok": ...,
# "checks": {...}}; exits 0 only when every check passed. Install: apt-get install ruby-pg.

require 'json'
require 'pg'

def env(name)
  v = ENV.fetch(name, '')
  raise "environment variable #{name} is not set" if v.empty?

  v
end

def connect
  PG.connect(host: env('LG_HOST'), hostaddr: env('LG_HOSTADDR'), port: env('LG_PORT'),
             dbname: env('LG_DBNAME'), user: env('LG_USER'), sslmode: 'verify-full',
             sslrootcert: env('LG_SSLROOTCERT'), sslcert: env('LG_SSLCERT'),
             sslkey: env('LG_SSLKEY'), connect_timeout: 15)
end

def expect(cond, what)
  raise "check failed: #{what}" unless cond
end

# Runs `sql` with exec_params (the extended protocol) as COPY FROM STDIN with `rows`; returns
# the final result (raises PG::Error for a failed COPY).
def copy_in_extended(conn, sql, rows)
  conn.exec_params(sql, [])
  rows.each { |r| conn.put_copy_data(r) }
  conn.put_copy_end
  last = nil
  while (r = conn.get_result)
    r.check
    last = r
  end
  last
end

result = { client: 'ruby-pg', pg: PG::VERSION, libpq: PG.library_version, checks: {} }
begin
  conn = connect
  conn.exec('create temp table cp (a int, b text)')
  copy_in_extended(conn, 'copy cp from stdin', (1..5000).map { |i| "#{i}\tr#{i}\n" })
  n = conn.exec('select count(*) from cp').getvalue(0, 0).to_i
  expect(n == 5000, "COPY IN #{n} rows")
  state = nil
  begin
    copy_in_extended(conn, 'copy cp from stdin', ["1\tok\n", "x\tbad\n"])
  rescue PG::Error => e
    state = e.result&.error_field(PG::PG_DIAG_SQLSTATE)
  end
  expect(state == '22P02', "failed extended COPY: #{state.inspect}")
  conn.exec_params('copy (select a from cp where a <= 3 order by a) to stdout', [])
  out = +''
  while (row = conn.get_copy_data)
    out << row
  end
  conn.get_result
  expect(out == "1\n2\n3\n", "COPY OUT #{out.inspect}")
  user = conn.exec('select current_user::text').getvalue(0, 0)
  expect(conn.transaction_status == PG::PQTRANS_IDLE, 'idle at the end')
  conn.close
  result[:checks][:copy_extended] = { ok: true, rows: n, failed_copy: state, session_user: user }
rescue StandardError => e
  result[:checks][:copy_extended] = { ok: false, error: "#{e.class}: #{e.message}" }
end
result[:ok] = result[:checks].values.all? { |c| c[:ok] }
puts JSON.generate(result)
exit(result[:ok] ? 0 : 1)
