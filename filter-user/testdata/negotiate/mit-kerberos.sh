#!/bin/sh
# Writes kerberos-init.b64: the Negotiate token curl sends with MIT Kerberos (SPNEGO
# NegTokenInit offering krb5, with an AP-REQ for HTTP/mail.example.org) in a throw-away
# realm on loopback. Needs Debian's krb5-kdc, krb5-admin-server, krb5-user and curl.
#   sh filter-user/testdata/negotiate/mit-kerberos.sh
set -eu
out="$(cd "$(dirname "$0")" && pwd)/kerberos-init.b64"
work="$(mktemp -d)"
cd "$work"
cat > krb5.conf <<CONF
[libdefaults]
  default_realm = EXAMPLE.ORG
  dns_lookup_kdc = false
  rdns = false
  dns_canonicalize_hostname = false
[realms]
  EXAMPLE.ORG = {
    kdc = 127.0.0.1:18888
  }
[domain_realm]
  mail.example.org = EXAMPLE.ORG
CONF
cat > kdc.conf <<CONF
[kdcdefaults]
  kdc_ports = 18888
  kdc_tcp_ports = 18888
[realms]
  EXAMPLE.ORG = {
    database_name = $work/principal
    key_stash_file = $work/stash
    acl_file = $work/kadm5.acl
  }
CONF
touch kadm5.acl
export KRB5_CONFIG="$work/krb5.conf" KRB5_KDC_PROFILE="$work/kdc.conf" KRB5CCNAME="FILE:$work/cc"
kdb5_util create -s -P masterpw -r EXAMPLE.ORG >/dev/null
kadmin.local -q "addprinc -pw Passw0rd alice" >/dev/null
kadmin.local -q "addprinc -randkey HTTP/mail.example.org" >/dev/null
krb5kdc -n & kdc=$!
cat > serve.py <<'PY'
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        auth = self.headers.get("Authorization")
        if auth:
            open(sys.argv[1], "w").write(auth.split(" ", 1)[1] + "\n")
        self.send_response(200 if auth else 401)
        if not auth:
            self.send_header("WWW-Authenticate", "Negotiate")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", 18080), H).serve_forever()
PY
python3 serve.py "$out" & web=$!
sleep 1
echo Passw0rd | kinit alice >/dev/null
curl -s -o /dev/null --negotiate -u : --resolve mail.example.org:18080:127.0.0.1 \
  http://mail.example.org:18080/
kill "$web" "$kdc"
rm -rf "$work"
