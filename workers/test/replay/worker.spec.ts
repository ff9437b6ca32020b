// A Worker's tests with env.AI answered from recordings (test/recordings/, made by `workers-ai-local --upstream`)
// and the platform's failures asked for through the binding's extraHeaders. No credentials, no network, no mocks.
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";

const MODEL = "@cf/meta/llama-3.1-8b-instruct-fast";
const FAULT = "x-workers-ai-local-fault";
const fault = (name: string) => ({ extraHeaders: { [FAULT]: name } });
// What the recorded answer says: recorded once, then asserted on in every run.
const RECORDED = "Bonjour! I'm your guide to";

// The code under test: retries the platform's capacity error, and turns a used-up daily allocation into a
// message for the user.
async function greet(ai: Ai, city: string, options: AiOptions = {}): Promise<string> {
  for (let attempt = 1; ; attempt++) {
    try {
      const inputs = { prompt: `Say hello to ${city}`, max_tokens: 8, temperature: 0 };
      const result = (await ai.run(MODEL, inputs, options)) as { response: string };
      return result.response;
    } catch (error) {
      const message = (error as Error).message;
      if (message.startsWith("3040:") && attempt < 3) continue;
      if (/^(3036|4006):/.test(message)) return "The assistant is resting until tomorrow.";
      throw error;
    }
  }
}

function events(text: string): string[] {
  return text.trim().split("\n\n").map((event) => event.slice("data: ".length));
}

describe("a Worker tested against recorded answers", () => {
  it("greets with the recorded answer", async () => {
    expect(await greet(env.AI, "Paris")).toBe(RECORDED);
  });

  it("streams the recorded events", async () => {
    const stream = await env.AI.run(MODEL, { prompt: "Say hello to Paris", max_tokens: 8, temperature: 0, stream: true });
    const data = events(await new Response(stream as ReadableStream).text());
    expect(data.at(-1)).toBe("[DONE]");
    const pieces = data.slice(0, -2).map((event) => JSON.parse(event).response);
    expect(pieces.join("")).toBe(RECORDED);
  });

  it("gives up after three capacity errors, with the platform's error", async () => {
    const error = await greet(env.AI, "Paris", fault("capacity")).catch((e: Error) => e);
    expect(error).toBeInstanceOf(Error);
    expect((error as Error).name).toBe("InferenceUpstreamError");
    expect((error as Error).message).toBe("3040: Capacity temporarily exceeded, please try again.");
  });

  it("tells the user when the daily allocation is used up", async () => {
    expect(await greet(env.AI, "Paris", fault("daily-limit"))).toBe("The assistant is resting until tomorrow.");
    expect(await greet(env.AI, "Paris", fault("4006"))).toBe("The assistant is resting until tomorrow.");
  });

  it("sees a stream that breaks after two pieces end with the error event", async () => {
    const inputs = { prompt: "Say hello to Paris", max_tokens: 8, temperature: 0, stream: true };
    const stream = await env.AI.run(MODEL, inputs, fault("stream-2"));
    const data = events(await new Response(stream as ReadableStream).text()).map((event) => JSON.parse(event));
    expect(data.length).toBe(3);
    expect(RECORDED.startsWith(data[0].response + data[1].response)).toBe(true);
    expect(data[2]).toEqual({ error: { code: 3043, message: "Internal server error" } });
  });
});
