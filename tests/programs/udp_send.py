# udp_send.py IP PORT DATA COUNT: sends the datagram DATA to IP:PORT, COUNT times.
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[4])):
    s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
