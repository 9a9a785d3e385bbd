import hashlib
def serve(s, tag):
    while True:
        c, a = s.accept()
        data = b""
        while True:
            b = c.recv(65536)
            if not b:
                break
            data += b
        c.sendall(("%s %s %s\n" % (hashlib.sha256(data).hexdigest(), tag, a[0])).encode())
        c.close()
