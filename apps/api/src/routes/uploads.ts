import { randomUUID } from 'node:crypto';
import { UPLOAD_TYPES, UploadRequest, UploadResponse } from '@kiln/contracts';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import type { ApiContext } from '../context.js';
import { tenantArea } from '../tenancy.js';

/**
 * POST /v1/uploads: how a client puts a file into Kiln — an input image, mask or control image,
 * or a training dataset's images, captions and manifest. Kiln answers with a presigned PUT URL
 * for a key in the caller's own area of the bucket (`tenants/<tenant>/uploads/…`), so the file
 * goes straight to storage and the client never holds S3 credentials. A presigned PUT cannot
 * bind its size, so the limits are checked when the object is used (an image is decoded at
 * submission, a dataset's sizes are checked when it is resolved); the type and size asked for
 * here are checked now. The object is deleted UPLOAD_RETENTION_S after the last request for it.
 */
export function uploadRoutes(ctx: ApiContext): FastifyPluginAsyncZod {
  return async (app) => {
    app.post(
      '/v1/uploads',
      {
        schema: {
          summary: 'Upload a file: a presigned PUT URL and the s3_key to use',
          description:
            'Then `PUT` the file to `url` with the `content-type` given, and name `s3_key` in a request (`image.init.s3_key`, `controlnets[].image.s3_key`, `dataset.manifest`, or its folder as `dataset.s3_prefix`). Keys are under `tenants/<tenant>/uploads/`; with `path`, files keep the names you give (a dataset is a folder of images with same-named .txt captions).',
          body: UploadRequest,
          response: { 201: UploadResponse },
        },
      },
      async (req, reply) => {
        const { content_type: type, path } = req.body;
        const name = path ?? `${randomUUID()}.${UPLOAD_TYPES[type].extensions[0]}`;
        const s3_key = `${tenantArea(req.principal.tenant)}uploads/${name}`;
        const now = Date.now();
        const expiresAt = now + ctx.env.UPLOAD_RETENTION_S * 1000;
        const url = await ctx.storage.presignPut(s3_key, ctx.env.UPLOAD_URL_EXPIRY_S);
        await ctx.redis.zadd(ctx.keys.uploads(), expiresAt, s3_key);
        return reply.code(201).send({
          s3_key,
          url,
          method: 'PUT' as const,
          headers: { 'content-type': type },
          max_bytes: UPLOAD_TYPES[type].maxBytes,
          url_expires_at: new Date(now + ctx.env.UPLOAD_URL_EXPIRY_S * 1000).toISOString(),
          expires_at: new Date(expiresAt).toISOString(),
        });
      },
    );
  };
}
