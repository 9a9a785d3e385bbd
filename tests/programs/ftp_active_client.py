"""Python's ftplib in active mode (set_pasv(False)): downloads FILE from HOST:PORT
anonymously into OUT.

    ftp_active_client.py HOST PORT FILE OUT

ftplib listens on ("", 0) and sends `PORT a,b,c,d,p1,p2` with the IP of its control
connection's getsockname() and the listener's getsockname() port. Prints the wire
(`*cmd* 'PORT ...'`, `*resp* '200 ...'`) and, once the file is in, `DONE <bytes>`.
"""
import ftplib
import sys

host, port, name, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ftp = ftplib.FTP(timeout=20)
ftp.set_debuglevel(1)
ftp.connect(host, port)
ftp.login()
ftp.set_pasv(False)
with open(out, "wb") as f:
    ftp.retrbinary(f"RETR {name}", f.write)
ftp.quit()
with open(out, "rb") as f:
    print(f"DONE {len(f.read())}", flush=True)
