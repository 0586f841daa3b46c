// A real webhook receiver for local development and tests. Every delivery is verified with the
// `standardwebhooks` package (the reference implementation of the specification, not ours).
//
// Deliveries go to POST /hooks/<inbox> (any name: tests use one inbox each, so they do not see each
// other's deliveries). Per inbox, the admin API sets how it answers and lists what it received:
//   PUT    /admin/inboxes/<inbox>   {"mode": "ok"|"fail"|"hang"|"gone"|"flood", "status"?: 500, "secrets"?: ["whsec_…"]}
//   GET    /admin/inboxes/<inbox>   {"deliveries": [...]} every request, in arrival order
//   DELETE /admin/inboxes/<inbox>   forget the inbox
// "hang" never answers (until the mode changes); "gone" answers 410; "flood" answers the fail status
// with a body that never ends (until the sender stops reading or the mode changes). Secrets default to the ones
// the receiver was started with.
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { Webhook } from "standardwebhooks";
import { readBody } from "../read-body.ts";

export type InboxMode = "ok" | "fail" | "hang" | "gone" | "flood";

export interface Delivery {
  /** `webhook-id`: the same on every retry of one event. */
  id: string | null;
  timestamp: string | null;
  /** Which of the inbox's secrets verified it (by position); empty = rejected with 401. */
  verifiedWith: number[];
  /** What the receiver answered (0 when it hung). */
  answered: number;
  payload: unknown;
  receivedAt: string;
}

interface Inbox {
  mode: InboxMode;
  failStatus: number;
  secrets: string[];
  deliveries: Delivery[];
  hanging: Set<ServerResponse>;
}

export interface WebhookReceiverOptions {
  host?: string;
  port?: number;
  /** `whsec_…` secrets a delivery may be signed with (an inbox can replace them). */
  secrets?: string[];
  /** Called with each verified delivery (the dev CLI prints it). */
  onVerified?: (inbox: string, delivery: Delivery) => void;
}

export interface WebhookReceiver {
  url: string;
  close(): Promise<void>;
}

const MAX_BODY_BYTES = 1024 * 1024;
/** What a "flood" answer repeats, in chunks of FLOOD_CHUNK_BYTES. */
const FLOOD_TEXT = "flood ";
const FLOOD_CHUNK_BYTES = 64 * 1024;

export async function startWebhookReceiver(options: WebhookReceiverOptions = {}): Promise<WebhookReceiver> {
  const inboxes = new Map<string, Inbox>();
  const inbox = (name: string): Inbox => {
    let found = inboxes.get(name);
    if (!found) {
      found = { mode: "ok", failStatus: 500, secrets: options.secrets ?? [], deliveries: [], hanging: new Set() };
      inboxes.set(name, found);
    }
    return found;
  };

  const server = createServer((request, response) => {
    handle(request, response).catch((error: unknown) => {
      if (!response.headersSent) send(response, 500, { error: String(error) });
    });
  });

  async function handle(request: IncomingMessage, response: ServerResponse): Promise<void> {
    const url = new URL(request.url ?? "/", "http://receiver");
    const hook = /^\/hooks\/([\w.-]{1,100})\/?$/.exec(url.pathname);
    const admin = /^\/admin\/inboxes\/([\w.-]{1,100})$/.exec(url.pathname);
    if (hook?.[1] && request.method === "POST") return receive(hook[1], request, response);
    if (admin?.[1] && request.method === "GET") {
      return send(response, 200, { mode: inbox(admin[1]).mode, deliveries: inbox(admin[1]).deliveries });
    }
    if (admin?.[1] && request.method === "PUT") {
      const body = JSON.parse((await readBody(request, MAX_BODY_BYTES)) || "{}") as {
        mode?: InboxMode;
        status?: number;
        secrets?: string[];
      };
      const target = inbox(admin[1]);
      if (body.mode) target.mode = body.mode;
      if (body.status) target.failStatus = body.status;
      if (body.secrets) target.secrets = body.secrets;
      if (target.mode !== "hang") releaseHanging(target);
      return send(response, 200, { mode: target.mode });
    }
    if (admin?.[1] && request.method === "DELETE") {
      const target = inboxes.get(admin[1]);
      if (target) releaseHanging(target);
      inboxes.delete(admin[1]);
      return send(response, 204);
    }
    if (url.pathname === "/health") return send(response, 200, { ok: true });
    return send(response, 404, { error: "not found" });
  }

  async function receive(name: string, request: IncomingMessage, response: ServerResponse): Promise<void> {
    const target = inbox(name);
    const body = await readBody(request, MAX_BODY_BYTES);
    const headers = {
      "webhook-id": header(request, "webhook-id"),
      "webhook-timestamp": header(request, "webhook-timestamp"),
      "webhook-signature": header(request, "webhook-signature"),
    };
    const verifiedWith: number[] = [];
    let payload: unknown = null;
    target.secrets.forEach((secret, index) => {
      try {
        payload = new Webhook(secret).verify(body, headers);
        verifiedWith.push(index);
      } catch {
        // Not signed with this secret (or too old, or tampered).
      }
    });
    const answered =
      verifiedWith.length === 0
        ? 401
        : target.mode === "ok"
          ? 204
          : target.mode === "gone"
            ? 410
            : target.mode === "fail" || target.mode === "flood"
              ? target.failStatus
              : 0;
    const delivery: Delivery = {
      id: headers["webhook-id"] || null,
      timestamp: headers["webhook-timestamp"] || null,
      verifiedWith,
      answered,
      payload: payload ?? safeJson(body),
      receivedAt: new Date().toISOString(),
    };
    target.deliveries.push(delivery);
    if (verifiedWith.length > 0) options.onVerified?.(name, delivery);
    if (answered === 0 || (target.mode === "flood" && verifiedWith.length > 0)) {
      target.hanging.add(response);
      response.once("close", () => target.hanging.delete(response));
      if (answered !== 0) flood(response, answered);
      return;
    }
    send(response, answered, answered === 204 ? undefined : { received: verifiedWith.length > 0 });
  }

  /** Writes FLOOD_TEXT for as long as the sender reads, at the pace it reads. */
  function flood(response: ServerResponse, status: number): void {
    response.writeHead(status, { "content-type": "text/plain" });
    const chunk = FLOOD_TEXT.repeat(Math.ceil(FLOOD_CHUNK_BYTES / FLOOD_TEXT.length));
    const write = () => {
      while (!response.destroyed && response.write(chunk)) {
        // until the socket's buffer is full; "drain" resumes
      }
    };
    response.on("drain", write);
    write();
  }

  function releaseHanging(target: Inbox): void {
    for (const response of target.hanging) response.destroy();
    target.hanging.clear();
  }

  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(options.port ?? 0, options.host ?? "127.0.0.1", resolve);
  });
  const address = server.address() as AddressInfo;
  return {
    url: `http://${options.host ?? "127.0.0.1"}:${address.port}`,
    close: () =>
      new Promise<void>((resolve) => {
        for (const target of inboxes.values()) releaseHanging(target);
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

function header(request: IncomingMessage, name: string): string {
  const value = request.headers[name];
  return Array.isArray(value) ? (value[0] ?? "") : (value ?? "");
}

function safeJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

function send(response: ServerResponse, status: number, body?: unknown): void {
  if (body === undefined) {
    response.writeHead(status).end();
    return;
  }
  response.writeHead(status, { "content-type": "application/json" }).end(JSON.stringify(body));
}
