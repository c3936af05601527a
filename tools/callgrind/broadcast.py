# Broadcast driver for tools/callgrind/run: N sessions of tenant t, K tenant-wide events, every notification acked (compact JSON, as clients send it).
import asyncio, base64, hashlib, hmac, json, os, sys, time, urllib.request
import websockets

SECRET = os.environ["SECRET"]; ADMIN = os.environ["ADMIN"]
WS = os.environ["WS"]; BACKEND = os.environ["BACKEND"]
N = int(os.environ.get("N", "200")); K = int(os.environ.get("K", "50"))
PHASE = os.environ.get("PHASE_CMD", ""); PID = os.environ.get("PHASE_PID", "")

def b64(b): return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
def token(agent):
    h = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    p = b64(json.dumps({"sub": agent, "tenant_guid": "t", "ir_instance": "ir", "exp": int(time.time()) + 3600}).encode())
    s = b64(hmac.new(SECRET.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest())
    return f"{h}.{p}.{s}"

async def session(i, ready, got):
    ws = await websockets.connect(WS, max_size=None)
    await ws.send(json.dumps({"type": "hello", "uuid": f"h{i}", "data": {"token": token(f"a{i}")}}))
    while True:
        m = json.loads(await ws.recv())
        if m.get("type") == "hello_reply": break
        if m.get("type") == "error": raise SystemExit(f"hello refused: {m}")
    ready.release()
    n = 0
    while n < K:
        m = json.loads(await ws.recv())
        if "seq" in m:
            await ws.send(json.dumps({"type": "ack", "uuid": m["uuid"]}, separators=(",", ":")))
            n += 1
    got.append(n)
    await ws.close()

def post(i):
    body = json.dumps([{"record": "TenantUpdatedEvent", "value": {"tenantGuid": "t", "deltas": {"name": f"Acme {i}", "pad": "x" * 80}}}]).encode()
    req = urllib.request.Request(f"http://{BACKEND}/backend/v1/events", body, {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=600).read()

async def main():
    ready = asyncio.Semaphore(0); got = []
    tasks = [asyncio.create_task(session(i, ready, got)) for i in range(N)]
    for _ in range(N): await ready.acquire()
    if PHASE: os.system(f"{PHASE} on {PID}")
    t = time.time()
    for i in range(K):
        await asyncio.to_thread(post, i)
    await asyncio.gather(*tasks)
    if PHASE: os.system(f"{PHASE} off {PID}")
    print(f"delivered {sum(got)} in {time.time()-t:.1f}s", flush=True)

asyncio.run(main())
