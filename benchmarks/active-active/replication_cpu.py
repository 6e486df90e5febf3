"""In-process CPU cost of replication per request: two SharedState replicas on one loop over a real redis-server.
Per request on replica a: in-flight +1 then -1, an 8-block prefix insert, and one access-log end forwarded to b."""
import asyncio, random, time, resource
from extproc.harness import RedisProcess
from extproc.scheduling.plugins.prefix import PrefixIndex
from extproc.server.replication import SharedState, ReplicationSettings
from extproc.datalayer.endpoint import EndpointPool

PODS=[f"10.0.0.{i}:8000" for i in range(8)]
def state(rid, idx, url):
    pool=EndpointPool(); pool.set_endpoints(PODS)
    return SharedState(ReplicationSettings(url=url, replica_id=rid), pool, prefix_index=idx)

class AL:
    ever_connected=False; n=0
    def finish_forwarded(self,*a): AL.n+=1

async def main():
    redis=await RedisProcess.start()
    ia,ib=PrefixIndex(),PrefixIndex()
    a,b=state("ra",ia,redis.url),state("rb",ib,redis.url)
    a.access_log=AL()
    await a.start(); await b.start()
    while not ("rb" in a.peers and "ra" in b.peers): await asyncio.sleep(0.01)
    for rate in (1000, 3000):
        N=rate*4
        AL.n=0
        c0=time.process_time(); w0=time.perf_counter()
        ru0=resource.getrusage(resource.RUSAGE_CHILDREN)
        for i in range(N):
            ep=a.pool.get(PODS[i%8]); ep.add_inflight(100)
            ia.add([random.getrandbits(63) for _ in range(8)], PODS[i%8])
            b.forward_finish(f"ra.{i:x}", 200, "ok", time.time(), False)  # b got a's access-log entry
            ep.release_inflight(prefill_tokens=100)
            if i % (rate//200) == 0: await asyncio.sleep(0.005)
        while AL.n < N: await asyncio.sleep(0.01)
        wall=time.perf_counter()-w0; cpu=time.process_time()-c0
        print(f"rate~{N/wall:.0f} req/s: replication CPU in this process (both replicas) {cpu/N*1e6:.1f} us/request over {wall:.1f} s")
    await a.stop(); await b.stop(); await redis.stop()
asyncio.run(main())
