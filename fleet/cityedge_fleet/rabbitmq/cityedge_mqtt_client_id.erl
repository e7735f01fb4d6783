%% An authorization backend for RabbitMQ 3.10 that binds an MQTT client id to the user the
%% connection authenticated as (the certificate's CN): a CONNECT naming any other client
%% id is refused ("not authorized") before the MQTT plugin registers the id. Without it a
%% stolen device could name another device's client id and the plugin would close that
%% device's connection (the new holder of an id wins). Mosquitto does the same with
%% `use_username_as_clientid`; RabbitMQ 3.10's MQTT plugin has no such setting.
%%
%% Where it acts (read from the 3.10.8 plugin): `rabbit_mqtt_processor:process_connect`
%% logs in through a direct connection, and `rabbit_direct:connect1` checks vhost access
%% with a context that holds the client id (`<<"client_id">>`); the id is registered only
%% after that login succeeded. The authentication callbacks never see the id under
%% certificate login (`rabbit_direct:auth_fun` passes no properties without a password),
%% so the vhost check is the one place.
%%
%% Every other decision is the internal backend's: `broker_rabbitmq` lists this module
%% after `rabbit_auth_backend_internal` as an authorization backend, and RabbitMQ requires
%% every listed backend to allow. Connections without a client id (AMQP, the CLI) pass.
%% Loaded from the code path (`SERVER_CODE_PATH`), compiled by `broker_rabbitmq.write`.
-module(cityedge_mqtt_client_id).

%% the rabbit_authz_backend behaviour (not declared: it is compiled without RabbitMQ's
%% headers and code path)
-export([user_login_authorization/2, check_vhost_access/3, check_resource_access/4,
         check_topic_access/4, state_can_expire/0, update_state/2]).

user_login_authorization(_Username, _AuthProps) ->
    {ok, none}.

%% #auth_user{username, tags, impl} of rabbit_common's rabbit.hrl
check_vhost_access({auth_user, Username, _Tags, _Impl}, VHost, Context)
  when is_map(Context) ->
    case maps:find(<<"client_id">>, Context) of
        error ->
            true;
        {ok, Username} ->
            true;
        {ok, ClientId} ->
            logger:warning("cityedge: MQTT client id ~tp refused for user ~tp (vhost ~tp): "
                           "a client id must be its certificate's CN",
                           [ClientId, Username, VHost]),
            false
    end;
check_vhost_access(_AuthUser, _VHost, _NoContext) ->
    true.

check_resource_access(_AuthUser, _Resource, _Permission, _Context) ->
    true.

check_topic_access(_AuthUser, _Resource, _Permission, _Context) ->
    true.

state_can_expire() ->
    false.

update_state(AuthUser, _NewState) ->
    {ok, AuthUser}.
