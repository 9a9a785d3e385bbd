# One 100-byte datagram every 50 ms from 203.0.113.10:5555 to 203.0.113.1:20050, for ever.
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('203.0.113.10', 5555))
while True:
    s.sendto(b'x' * 100, ('203.0.113.1', 20050)); time.sleep(0.05)
