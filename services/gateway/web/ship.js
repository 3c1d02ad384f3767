// Deploy from a folder or a .tar.gz picked in the browser: a folder becomes a ustar archive
// (regular files only, mode 0644: browsers expose no modes, links or empty folders), gzip'd
// with CompressionStream, uploaded raw to POST /v1/projects/{id}/sources; the deployment then
// names the upload's sha256.

import { api } from "./api.js";

const BLOCK = 512;
const SKIPPED = /(^|\/)\.git(\/|$)/; // a checkout's history is never part of an app

function octal(value, width) {
  return value.toString(8).padStart(width - 1, "0") + "\0";
}

// name (<= 100 bytes) and prefix (<= 155 bytes), split at a "/" as ustar requires.
function splitName(path) {
  const bytes = new TextEncoder().encode(path);
  if (bytes.length <= 100) return [path, ""];
  for (let i = path.indexOf("/"); i !== -1; i = path.indexOf("/", i + 1)) {
    const prefix = path.slice(0, i);
    const name = path.slice(i + 1);
    const [p, n] = [new TextEncoder().encode(prefix).length, new TextEncoder().encode(name).length];
    if (p <= 155 && n <= 100 && n > 0) return [name, prefix];
  }
  throw new Error(`the path ${path} is too long for a tar archive made in the browser`);
}

function header(path, size, mtime) {
  const block = new Uint8Array(BLOCK);
  const put = (text, offset, width) => {
    const bytes = new TextEncoder().encode(text);
    block.set(bytes.subarray(0, width), offset);
  };
  const [name, prefix] = splitName(path);
  put(name, 0, 100);
  put(octal(0o644, 8), 100, 8);
  put(octal(0, 8), 108, 8); // uid
  put(octal(0, 8), 116, 8); // gid
  put(octal(size, 12), 124, 12);
  put(octal(Math.max(0, Math.floor(mtime / 1000)), 12), 136, 12);
  put("        ", 148, 8); // checksum counted as spaces
  put("0", 156, 1); // a regular file
  put("ustar\0", 257, 6);
  put("00", 263, 2);
  put(prefix, 345, 155);
  const sum = block.reduce((total, byte) => total + byte, 0);
  put(octal(sum, 7) + " ", 148, 8);
  return block;
}

// The folder's files, paths relative to the folder itself (as `tar -C folder .` would).
function entries(files) {
  const list = [];
  for (const file of files) {
    const full = file.webkitRelativePath || file.name;
    const path = full.includes("/") ? full.slice(full.indexOf("/") + 1) : full;
    if (!path || SKIPPED.test(path)) continue;
    list.push({ path, file });
  }
  if (list.length === 0) throw new Error("the folder has no files to ship");
  return list.sort((a, b) => (a.path < b.path ? -1 : 1));
}

export async function tarGzOfFolder(files) {
  if (typeof CompressionStream !== "function") {
    throw new Error("this browser cannot compress: pick a .tar.gz made with tar -czf instead");
  }
  const parts = [];
  for (const { path, file } of entries(files)) {
    parts.push(header(path, file.size, file.lastModified || 0), file);
    const pad = (BLOCK - (file.size % BLOCK)) % BLOCK;
    if (pad) parts.push(new Uint8Array(pad));
  }
  parts.push(new Uint8Array(BLOCK * 2)); // the end-of-archive marker
  const gzip = new Blob(parts).stream().pipeThrough(new CompressionStream("gzip"));
  const bytes = await new Response(gzip).arrayBuffer();
  return new Blob([bytes], { type: "application/gzip" });
}

// Uploads the archive and deploys it; `processType` empty means the Procfile's web.
export async function shipSource(projectId, archive, processType, replicas = 1) {
  const project = `/v1/projects/${encodeURIComponent(projectId)}`;
  const body = archive.type === "application/gzip" ? archive : new Blob([archive], { type: "application/gzip" });
  const source = await api("POST", `${project}/sources`, body);
  const deployment = { sourceSha256: source.sha256 };
  if (processType) deployment.processType = processType;
  if (replicas > 1) deployment.replicas = replicas;
  await api("POST", `${project}/deployments`, deployment);
  return source;
}
