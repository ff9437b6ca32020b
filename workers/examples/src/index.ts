// A developer's Worker, as the tests run it: the seed's two examples, unchanged, each behind a path of its own,
// and the other things a Worker does with env.AI (tools, a bad input, a conversation's second turn, a stream it
// drops, the binding's options), each answering what the Worker saw.
import seedWorker from "./seed-worker";
import seedWorkerStreaming from "./seed-worker-streaming";

interface Env {
  AI: Ai;
}

const MODEL = "@cf/meta/llama-3.1-8b-instruct-fast";
const COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,";
const SYSTEM = "You are a meticulous assistant who answers briefly and remembers names. ".repeat(8);
const weather = {
  name: "getWeather",
  description: "Get the current weather for a city",
  parameters: {
    type: "object",
    properties: { city: { type: "string", description: "The city name" } },
    required: ["city"],
  },
};

async function outcome(call: () => Promise<unknown>): Promise<Response> {
  try {
    return Response.json({ ok: true, value: await call() });
  } catch (error) {
    const { name, message } = error as Error;
    return Response.json({ ok: false, name, message });
  }
}

type Probe = (request: Request, env: Env, ctx: ExecutionContext) => Promise<Response>;

const probes: Record<string, Probe> = {
  "/seed/worker": (request, env, ctx) => seedWorker.fetch(request, env, ctx),
  "/seed/worker-streaming": (request, env, ctx) => seedWorkerStreaming.fetch(request, env, ctx),
  "/tools": (_, env) =>
    outcome(() =>
      env.AI.run(MODEL, {
        messages: [{ role: "user", content: "What is the weather in Paris?" }],
        tools: [weather],
        max_tokens: 64,
        temperature: 0,
      }),
    ),
  "/bad-input": (_, env) => outcome(() => env.AI.run(MODEL, { prompt: "Say hi.", temperature: 9 })),
  "/unknown-model": (_, env) => outcome(() => env.AI.run("@cf/meta/llama-9-unknown" as typeof MODEL, { prompt: "Hi" })),
  "/session": async (_, env) => {
    const options = { extraHeaders: { "x-session-affinity": `session-${crypto.randomUUID()}` } };
    const messages = [
      { role: "system", content: SYSTEM },
      { role: "user", content: "My name is Ada. Remember it." },
    ];
    const first = await env.AI.run(MODEL, { messages, max_tokens: 16, temperature: 0 }, options);
    messages.push({ role: "assistant", content: first.response }, { role: "user", content: "What is my name?" });
    const second = await env.AI.run(MODEL, { messages, max_tokens: 8, temperature: 0 }, options);
    return Response.json({ first: first.usage, second: second.usage });
  },
  "/drop-stream": async (_, env) => {
    const inputs = { prompt: COUNTING, raw: true, max_tokens: 900, temperature: 0, stream: true };
    const reader = (await env.AI.run(MODEL, inputs)).getReader();
    const { value } = await reader.read();
    await reader.cancel();
    return new Response(value);
  },
  "/raw-response": async (_, env) => {
    const response = await env.AI.run(MODEL, { prompt: "Say hi.", max_tokens: 4 }, { returnRawResponse: true });
    const contentType = response.headers.get("content-type");
    return Response.json({ status: response.status, contentType, body: await response.json() });
  },
  // The same run twice through an AI Gateway that caches: the answers, their cache status as the raw response
  // shows it, and the log id the binding keeps of each (env.AI.aiGatewayLogId).
  "/gateway": async (request, env) => {
    const id = new URL(request.url).searchParams.get("id") ?? "my-gateway";
    const options = { gateway: { id, cacheTtl: 60, metadata: { suite: "workers" } } };
    const inputs = { prompt: "Say hi.", max_tokens: 4, temperature: 1 };
    const answers = [];
    for (let i = 0; i < 2; i++) {
      const value = await env.AI.run(MODEL, inputs, options);
      answers.push({ value, logId: env.AI.aiGatewayLogId ?? null });
    }
    const raw = await env.AI.run(MODEL, inputs, { ...options, returnRawResponse: true });
    const status = raw.headers.get("cf-aig-cache-status");
    return Response.json({ answers, status, rawLogId: raw.headers.get("cf-aig-log-id"), body: await raw.json() });
  },
  "/reject-if-busy": (_, env) =>
    outcome(() => env.AI.run(MODEL, { prompt: "Say hi.", max_tokens: 2 }, { rejectIfBusy: true })),
  "/request-id": async (_, env) => {
    await env.AI.run(MODEL, { prompt: "Say hi.", max_tokens: 2 });
    return Response.json({ id: env.AI.lastRequestId });
  },
  "/models": (_, env) => outcome(() => env.AI.models()),
};

export default {
  async fetch(request, env, ctx): Promise<Response> {
    const probe = probes[new URL(request.url).pathname];
    return probe ? probe(request, env, ctx) : new Response("Not found", { status: 404 });
  },
} satisfies ExportedHandler<Env>;
