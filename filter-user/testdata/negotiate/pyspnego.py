"""Writes the NTLM-in-SPNEGO fixtures next to this file with pyspnego (a real client and
server, no network): a NegTokenInit carrying NTLM Type 1, the server's NegTokenResp with
the Type 2 challenge, and the client's NegTokenResp with Type 3 for EXAMPLE\\alice.

    python3 -m venv .venv && .venv/bin/pip install pyspnego==0.12.4
    .venv/bin/python3 filter-user/testdata/negotiate/pyspnego.py
"""

import base64
import os
import pathlib
import tempfile

import spnego

here = pathlib.Path(__file__).parent
with tempfile.NamedTemporaryFile("w", delete=False) as users:
    users.write("EXAMPLE:alice:Passw0rd\n")
os.environ["NTLM_USER_FILE"] = users.name
client = spnego.client("EXAMPLE\\alice", "Passw0rd", hostname="mail.example.org",
                       service="HTTP", protocol="negotiate")
server = spnego.server(protocol="negotiate")
init = client.step()
challenge = server.step(init)
answer = client.step(challenge)
server.step(answer)
assert server.complete and server.client_principal == "EXAMPLE\\alice"
os.unlink(users.name)
for name, token in [("ntlm-init", init), ("ntlm-challenge", challenge),
                    ("ntlm-answer", answer)]:
    (here / f"{name}.b64").write_text(base64.b64encode(token).decode() + "\n")
