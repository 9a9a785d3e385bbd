import asyncio, selectors, sys
async def handle(r, w):
    while True:
        b = await r.read(65536)
        if not b: break
        w.write(b); await w.drain()
    w.close()
async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=128)
    async with srv: await srv.serve_forever()
loop = asyncio.SelectorEventLoop(selectors.EpollSelector())
loop.run_until_complete(main())
