// The seed's Workers and env.AI itself, under vitest in workerd, answered by the workers-ai-local server.
import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import seedWorker from "../examples/src/seed-worker";
import seedWorkerStreaming from "../examples/src/seed-worker-streaming";

const MODEL = "@cf/meta/llama-3.1-8b-instruct-fast";

async function call(worker: ExportedHandler<Env>): Promise<Response> {
  const ctx = createExecutionContext();
  const response = await worker.fetch!(new Request("http://example.com/"), env, ctx);
  await waitOnExecutionContext(ctx);
  return response;
}

describe("env.AI served by workers-ai-local", () => {
  it("answers the seed's Worker with a completion", async () => {
    const result = await (await call(seedWorker)).json<{ response: string; usage: Record<string, number> }>();
    expect(result.response.length).toBeGreaterThan(0);
    expect(result.usage.completion_tokens).toBeGreaterThan(0);
    expect(result.usage.total_tokens).toBe(result.usage.prompt_tokens + result.usage.completion_tokens);
  });

  it("streams the seed's streaming Worker as Server-Sent Events", async () => {
    const response = await call(seedWorkerStreaming);
    expect(response.headers.get("content-type")).toBe("text/event-stream");
    const events = (await response.text()).trim().split("\n\n");
    expect(events.at(-1)).toBe("data: [DONE]");
    const pieces = events.slice(0, -2).map((event) => JSON.parse(event.slice("data: ".length)).response);
    expect(pieces.join("").length).toBeGreaterThan(0);
  });

  it("gives tool calls", async () => {
    const result = await env.AI.run(MODEL, {
      messages: [{ role: "user", content: "What is the weather in Paris?" }],
      tools: [
        {
          name: "getWeather",
          description: "Get the current weather for a city",
          parameters: {
            type: "object",
            properties: { city: { type: "string", description: "The city name" } },
            required: ["city"],
          },
        },
      ],
      max_tokens: 64,
      temperature: 0,
    });
    expect(result.tool_calls[0].name).toBe("getWeather");
    expect(typeof result.tool_calls[0].arguments.city).toBe("string");
  });

  it("caches through an AI Gateway and names each answer's log", async () => {
    const gateway = { id: `vitest-${crypto.randomUUID()}`, cacheTtl: 60 };
    const inputs = { prompt: "Name a colour.", max_tokens: 6, temperature: 1 };
    const first = await env.AI.run(MODEL, inputs, { gateway });
    const firstLog = env.AI.aiGatewayLogId;
    const second = await env.AI.run(MODEL, inputs, { gateway });
    expect(second).toEqual(first);
    expect(firstLog).toMatch(/^[0-9A-Z]{26}$/);
    expect(env.AI.aiGatewayLogId).toMatch(/^[0-9A-Z]{26}$/);
    expect(env.AI.aiGatewayLogId).not.toBe(firstLog);
  });

  it("raises a bad input in the Worker as InferenceUpstreamError 5006", async () => {
    const error = await env.AI.run(MODEL, { prompt: "Say hi.", temperature: 9 }).catch((e: Error) => e);
    expect(error).toBeInstanceOf(Error);
    expect(error.name).toBe("InferenceUpstreamError");
    expect(error.message).toMatch(/^5006: AiError: Bad input: .*'\/temperature' must be <= 5/);
  });
});
