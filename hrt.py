import asyncio, json, websockets
async def main():
    w = await websockets.connect("ws://127.0.0.1:19605/v1/responses", additional_headers={"Authorization":"Bearer sk-alice"}, ping_interval=None)
    for i in range(2):
        await w.send(json.dumps({"type":"response.create","model":"m","input":"x"}))
        while json.loads(await w.recv())["type"]!="response.completed": pass
        print("turn", i, "ok; sleeping 5s"); await asyncio.sleep(5)
    await w.close()
asyncio.run(main())
