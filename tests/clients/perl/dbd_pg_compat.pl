#!/usr/bin/perl
# Perl DBI with DBD::Pg (Debian libdbd-pg-perl, on the system libpq) through leasegate with
# sslmode=verify-full and a client certificate: a query, server-side prepared statements with
# placeholders (DBD::Pg's default), SQLSTATEs ($dbh->state) with the session usable after, COPY
# FROM STDIN (pg_putcopydata) and TO STDOUT (pg_getcopydata), pg_cancel of an asynchronous
# pg_sleep (libpq PQcancel: a plaintext CancelRequest) -> 57014, LISTEN/NOTIFY (pg_notifies)
# with the own pid = $dbh->{pg_pid}.
#
# Driven by tests/integration/compat_dbd_pg.rs; the connection comes from the LG_* variables.
# Prints one JSON line {"ok": ..., "checks": {...}} and exits 0 only when every check passed.
# Install: apt-get install libdbd-pg-perl
use strict;
use warnings;
use DBI;
use DBD::Pg qw(:async);
use JSON::PP;
use Time::HiRes qw(time sleep);

sub env { my $v = $ENV{$_[0]}; die "environment variable $_[0] is not set\n" unless defined $v && length $v; $v }

sub dsn {
    my (%o) = @_;
    my %k = (host => env('LG_HOST'), hostaddr => env('LG_HOSTADDR'), port => env('LG_PORT'),
             dbname => env('LG_DBNAME'), sslmode => 'verify-full', sslrootcert => env('LG_SSLROOTCERT'),
             sslcert => env('LG_SSLCERT'), sslkey => env('LG_SSLKEY'), connect_timeout => 15, %o);
    return 'dbi:Pg:' . join(';', map { "$_=$k{$_}" } sort keys %k);
}

sub connect_pg {
    DBI->connect(dsn(@_), env('LG_USER'), '', { RaiseError => 1, PrintError => 0, AutoCommit => 1 })
        or die "connect: $DBI::errstr\n";
}

sub expect { die "check failed: $_[1]\n" unless $_[0] }

my %result = (client => 'DBD::Pg', dbd_pg => "$DBD::Pg::VERSION", dbi => "$DBI::VERSION",
              perl => sprintf('%vd', $^V), checks => {});

sub check {
    my ($name, $fn) = @_;
    my $started = time;
    my $d = eval { $fn->() };
    if (my $err = $@) {
        $result{checks}{$name} = { ok => JSON::PP::false, error => "$err" };
        return;
    }
    $d->{ok} = JSON::PP::true;
    $d->{ms} = int((time - $started) * 1000);
    $result{checks}{$name} = $d;
}

check(verify_full_tls => sub {
    my $dbh = connect_pg();
    my ($user) = $dbh->selectrow_array('select current_user::text');
    expect($user ne env('LG_USER'), "session user $user is a dynamic role");
    $dbh->disconnect;
    my $bad = DBI->connect(dsn(host => 'wrong.example'), env('LG_USER'), '', { RaiseError => 0, PrintError => 0 });
    expect(!$bad, 'a wrong host name was accepted');
    return { session_user => $user, wrong_name_refused => substr($DBI::errstr // '', 0, 200) };
});

check(queries => sub {
    my $dbh = connect_pg();
    $dbh->do('create temp table q (id int primary key, v text)');
    my $ins = $dbh->prepare('insert into q values (?, ?)');
    $ins->execute($_, "v$_") for 1 .. 10;
    my $sel = $dbh->prepare('select v from q where id = $1');
    my @got = map { $sel->execute($_); my ($v) = $sel->fetchrow_array; $sel->finish; $v } 1 .. 3;
    expect("@got" eq 'v1 v2 v3', "prepared results @got");
    my ($named) = $dbh->selectrow_array("select count(*) from pg_prepared_statements");
    expect($named >= 2, "$named server-side prepared statements");
    my %codes;
    for ([unique_violation => 'insert into q values (1, ?)', 'dup'], [division_by_zero => 'select 1/?::int', 0]) {
        my ($what, $sql, @bind) = @$_;
        eval { $dbh->do($sql, undef, @bind); 1 } and die "$what accepted\n";
        $codes{$what} = $dbh->state;
    }
    expect($codes{unique_violation} eq '23505' && $codes{division_by_zero} eq '22012',
           "codes $codes{unique_violation} $codes{division_by_zero}");
    $dbh->begin_work;
    $dbh->do('insert into q values (11, ?)', undef, 'kept');
    $dbh->pg_savepoint('s1');
    eval { $dbh->do('insert into q values (11, ?)', undef, 'dup'); 1 } and die "duplicate in savepoint accepted\n";
    $dbh->pg_rollback_to('s1');
    $dbh->commit;
    my ($n) = $dbh->selectrow_array('select count(*) from q');
    expect($n == 11, "rows $n");
    $dbh->disconnect;
    return { sqlstates => \%codes, server_prepared => $named + 0 };
});

check(copy => sub {
    my $dbh = connect_pg();
    $dbh->do('create temp table cp (a int, b text)');
    $dbh->do('copy cp from stdin');
    $dbh->pg_putcopydata("$_\tr$_\n") for 0 .. 19999;
    $dbh->pg_putcopyend;
    my ($n) = $dbh->selectrow_array('select count(*) from cp');
    expect($n == 20000, "COPY IN $n");
    $dbh->do('copy (select a, b from cp where a < 3 order by a) to stdout');
    my ($line, $out) = ('', '');
    $out .= $line while $dbh->pg_getcopydata($line) >= 0;
    expect($out eq "0\tr0\n1\tr1\n2\tr2\n", "COPY OUT $out");
    $dbh->disconnect;
    return { copy_in => $n + 0 };
});

check(cancel => sub {
    my $dbh = connect_pg();
    my $started = time;
    $dbh->do('select pg_sleep(30)', { pg_async => PG_ASYNC });
    sleep 0.3;
    expect($dbh->pg_cancel, 'pg_cancel');
    my $state = $dbh->state;
    my $took = time - $started;
    expect($state eq '57014' && $took < 10, "cancel: state $state after $took s");
    my ($two) = $dbh->selectrow_array('select 2');
    expect($two == 2, 'usable after the cancel');
    $dbh->disconnect;
    return { sqlstate => $state };
});

check(listen_notify => sub {
    my $dbh = connect_pg();
    $dbh->do('listen lg_own');
    $dbh->do(q{notify lg_own, 'mine'});
    my $n;
    for (1 .. 100) { last if $n = $dbh->pg_notifies; sleep 0.1; $dbh->do('select 1') }
    expect($n, 'no own notification within 10 s');
    my ($channel, $pid, $payload) = @$n;
    my $key_pid = $dbh->{pg_pid};
    expect($pid == $key_pid, "own pid $pid vs pg_pid $key_pid");
    $dbh->disconnect;
    return { own_pid => $pid + 0, key_pid => $key_pid + 0, payload => $payload };
});

$result{ok} = (grep { !$_->{ok} } values %{ $result{checks} }) ? JSON::PP::false : JSON::PP::true;
print JSON::PP->new->canonical->encode(\%result), "\n";
exit($result{ok} ? 0 : 1);
