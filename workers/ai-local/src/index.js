// workers-ai-local's stand-in for a Worker's AI binding under `wrangler dev`, where the real binding is always
// remote. A dev-only service binding named AI points at this entrypoint, and `env.AI.run(model, inputs, options)`
// then sends the very request workerd's binding sends (POST /run?version=3, {inputs, options}, the model in
// cf-consn-model-id) to the server in AI_SERVER_URL, and hands back what the real binding hands back: the bare
// result for a JSON answer, the body stream otherwise, the raw Response with returnRawResponse, and for an error
// an InferenceUpstreamError whose message is "<code>: <message>".
import { WorkerEntrypoint } from "cloudflare:workers";

const SDK_VERSION = "2.0.0"; // what workerd's binding sends in cf-consn-sdk-version

function upstreamError(message, name = "InferenceUpstreamError") {
  const error = new Error(message);
  // Crosses the RPC boundary when both Workers have compatibility_date 2026-04-21 or later (otherwise the
  // caller sees an Error whose message starts with the name).
  error.name = name;
  return error;
}

async function errorOf(response) {
  const text = await response.text();
  try {
    const { errors } = JSON.parse(text);
    if (errors?.[0]) return upstreamError(`${errors[0].code}: ${errors[0].message}`);
  } catch {
    // not JSON: the text is the message, as the binding does
  }
  return upstreamError(text);
}

export default class WorkersAiLocal extends WorkerEntrypoint {
  headers(extra = {}) {
    const token = this.env.AI_SERVER_TOKEN;
    return token ? { ...extra, authorization: `Bearer ${token}` } : extra;
  }

  async run(model, inputs, options = {}) {
    // Like the binding: these shape the request and never travel in the body.
    const { prefix, extraHeaders, sessionOptions, signal, ...sent } = options ?? {};
    const url = new URL(sent.gateway?.id ? "/ai-gateway/run" : "/run", this.env.AI_SERVER_URL);
    url.searchParams.set("version", "3");
    const response = await fetch(url, {
      method: "POST",
      headers: this.headers({
        ...extraHeaders,
        "content-type": "application/json",
        "cf-consn-sdk-version": SDK_VERSION,
        "cf-consn-model-id": prefix ? `${prefix}:${model}` : model,
      }),
      body: JSON.stringify({ inputs, options: sent }),
    });
    if (sent.returnRawResponse) return response;
    if (!response.ok || !response.body) throw await errorOf(response);
    if (response.headers.get("content-type") === "application/json") return response.json();
    return response.body;
  }

  async models(params = {}) {
    const url = new URL("/ai-api/models/search", this.env.AI_SERVER_URL);
    for (const [key, value] of Object.entries(params)) url.searchParams.set(key, String(value));
    const response = await fetch(url, { headers: this.headers() });
    const body = await response.json();
    if (!response.ok) throw upstreamError(body.errors?.[0]?.message ?? "Internal Error", "AiInternalError");
    return body.result;
  }

  async fetch() {
    return new Response("workers-ai-local: bind this Worker as AI and call env.AI.run()\n", { status: 404 });
  }
}
