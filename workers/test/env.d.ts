declare module "cloudflare:test" {
  interface ProvidedEnv extends Env {}
}
interface Env {
  AI: Ai;
}
